"""Resume is exact; checkpoints are verified; accumulation and precisions work."""

import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest
import torch

from attention_simulator.checkpoint import list_checkpoints
from attention_simulator.errors import CheckpointError, ConfigError

from ..helpers import train

# dropout and stochastic depth make every step consume random numbers: resume must restore them
RANDOM = ["+experiment=vit_sigmoid", "model.drop_path=0.2", "attention.attn_drop=0.1", "data.batch_size=32"]
CHECKPOINTED = [*RANDOM, "trainer.max_steps=4", "trainer.checkpoint_every=2"]  # a run several tests read


def final_weights(run_dir):
    state = torch.load(list_checkpoints(run_dir / "checkpoints")[-1], weights_only=True)
    return state["model"], state["optimizer"]


def test_resume_continues_bitwise(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(straight, *RANDOM, "trainer.max_steps=20", "trainer.eval_every=5")
    train(split, *RANDOM, "trainer.max_steps=20", "trainer.run_steps=10", "trainer.eval_every=5")
    train(split, *RANDOM, "trainer.max_steps=20", "trainer.eval_every=5", "trainer.resume=auto")

    (model_a, opt_a), (model_b, opt_b) = final_weights(straight), final_weights(split)
    for k in model_a:
        assert torch.equal(model_a[k], model_b[k]), k
    exp_avg_a, exp_avg_b = opt_a[1][0]["exp_avg"], opt_b[1][0]["exp_avg"]
    assert all(torch.equal(exp_avg_a[k], exp_avg_b[k]) for k in exp_avg_a)
    rows_a, rows_b = pd.read_parquet(straight / "metrics.parquet"), pd.read_parquet(split / "metrics.parquet")
    pd.testing.assert_series_equal(rows_a["train/loss"], rows_b["train/loss"])
    pd.testing.assert_series_equal(rows_a["eval/accuracy"], rows_b["eval/accuracy"])
    assert list(rows_a["step"]) == list(rows_b["step"])  # the resumed run's rows are not duplicated
    examples = [pd.read_parquet(run / "eval_examples.parquet") for run in (straight, split)]
    pd.testing.assert_frame_equal(*examples)


def test_final_evaluation_keeps_each_test_image(trained):
    """eval_examples.parquet: the final evaluation's loss and accuracy of each of the 360 test
    images (a count of one each); their means are the logged eval metrics."""
    run = trained(*RANDOM, "trainer.max_steps=2").dir
    examples = pd.read_parquet(run / "eval_examples.parquet")
    logged = pd.read_parquet(run / "metrics.parquet").set_index("step").loc[2]
    assert len(examples) == 360 and set(examples["eval/accuracy"]) <= {0.0, 1.0}
    assert (examples[["eval/loss count", "eval/accuracy count"]] == 1).all().all()
    assert set(examples["split"]) == {""}  # the test split, the only one
    for metric in ("eval/loss", "eval/accuracy"):
        assert examples[metric].mean() == pytest.approx(logged[metric], rel=1e-6)


def test_final_evaluation_keeps_each_sequence_at_each_length(tmp_path):
    """A language model evaluated at 64 and 128 tokens: one row per validation sequence of each
    length (`split` "" and "@128"), each counting its tokens; per split, the sums' ratios are
    the logged eval/loss and eval/loss@128, and bits per byte."""
    train(tmp_path, "+experiment=lm_sigmoid", "data.seq_len=64", "data.eval_seq_lens=[64,128]",
          "data.eval_max_tokens=4096", "trainer.max_steps=2", "task.sample_prompts=[]")  # fmt: skip
    examples = pd.read_parquet(tmp_path / "eval_examples.parquet")
    logged = pd.read_parquet(tmp_path / "metrics.parquet").set_index("step").loc[2]
    assert set(examples["split"]) == {"", "@128"}
    for split, length in (("", 64), ("@128", 128)):
        rows = examples[examples["split"] == split]
        assert len(rows) > 8 and (rows["eval/loss count"] == length).all()
        for metric in ("eval/loss", "eval/bits_per_byte"):
            ratio = rows[metric].sum() / rows[f"{metric} count"].sum()
            assert ratio == pytest.approx(logged[metric + split], rel=1e-6)


def test_checkpoint_digests_are_in_sha256sum_format(trained):
    run = trained(*RANDOM, "trainer.max_steps=2").dir
    result = subprocess.run(["sha256sum", "-c", "step_0000002.pt.sha256"], cwd=run / "checkpoints",
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 0 and "step_0000002.pt: OK" in result.stdout


def test_resume_from_a_run_directory_and_a_file(tmp_path, trained):
    first = trained(*CHECKPOINTED).dir
    ckpt = list_checkpoints(first / "checkpoints")[-1]
    train(tmp_path / "a", *RANDOM, "trainer.max_steps=6", f"trainer.resume={first}")
    train(tmp_path / "b", *RANDOM, "trainer.max_steps=6", f"trainer.resume={ckpt}")
    (a, _), (b, _) = final_weights(tmp_path / "a"), final_weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


def _corrupt(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(data)


def test_corrupt_and_half_written_checkpoints_are_not_loaded(tmp_path, trained):
    run_dir = shutil.copytree(trained(*CHECKPOINTED).dir, tmp_path / "run")
    older, newest = list_checkpoints(run_dir / "checkpoints")
    _corrupt(newest)
    with pytest.raises(CheckpointError, match="corrupt: its SHA-256 differs"):
        train(tmp_path / "x", *RANDOM, "trainer.max_steps=6", f"trainer.resume={newest}")
    older.with_name(older.name + ".sha256").unlink()  # as if the process died mid-save
    with pytest.raises(CheckpointError, match="not completely written"):
        train(tmp_path / "y", *RANDOM, "trainer.max_steps=6", f"trainer.resume={older}")
    with (
        pytest.warns(UserWarning, match="skipping step_0000004.pt"),
        pytest.raises(CheckpointError, match="no complete"),
    ):
        train(tmp_path / "z", *RANDOM, "trainer.max_steps=6", f"trainer.resume={run_dir}")


def test_missing_resume_path(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        train(tmp_path, *RANDOM, "trainer.resume=/no/such/step_0000001.pt")


def test_auto_resume_skips_a_corrupt_newest_checkpoint(tmp_path, trained):
    shutil.copytree(trained(*CHECKPOINTED).dir, tmp_path, dirs_exist_ok=True)
    _corrupt(list_checkpoints(tmp_path / "checkpoints")[-1])
    with pytest.warns(UserWarning, match="skipping step_0000004.pt"):
        train(tmp_path, *RANDOM, "trainer.max_steps=6", "trainer.resume=auto")
    assert (tmp_path / "checkpoints" / "step_0000006.pt").exists()


def test_fresh_start_refuses_to_overwrite_a_run(tmp_path, trained):
    shutil.copytree(trained(*RANDOM, "trainer.max_steps=2").dir, tmp_path, dirs_exist_ok=True)
    before = {p: p.read_bytes() for p in (tmp_path / "checkpoints").iterdir()}
    metrics = (tmp_path / "metrics.parquet").read_bytes()
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        train(tmp_path, *RANDOM, "trainer.max_steps=2")
    assert {p: p.read_bytes() for p in (tmp_path / "checkpoints").iterdir()} == before
    assert (tmp_path / "metrics.parquet").read_bytes() == metrics


def test_gradient_accumulation_matches_a_larger_batch(tmp_path):
    # SGD is linear in the gradient; Adam would turn rounding noise in zero-gradient entries
    # (the key bias, to which softmax is invariant) into full-size steps
    common = ["+experiment=vit_softmax", "trainer.max_steps=5", "trainer.grad_clip=null", "optimizer=sgd"]
    train(tmp_path / "big", *common, "data.batch_size=64")
    train(tmp_path / "acc", *common, "data.batch_size=32", "trainer.grad_accum=2")
    (a, _), (b, _) = final_weights(tmp_path / "big"), final_weights(tmp_path / "acc")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize("precision", ["fp16"])  # bf16: a documented command (tests/e2e/test_readme.py), torchrun's
def test_low_precision_trains(precision, tmp_path):
    train(
        tmp_path,
        "+experiment=vit_sigmoid",
        "trainer.max_steps=20",
        "data.batch_size=32",
        f"trainer.precision={precision}",
    )
    rows = pd.read_parquet(tmp_path / "metrics.parquet")
    loss = rows["train/loss"].dropna()
    assert loss.iloc[-1] < loss.iloc[0] and loss.notna().all()
    if precision == "fp16":
        assert rows["train/loss_scale"].dropna().iloc[-1] > 0


def test_fp16_gradient_diagnostics_are_unscaled(tmp_path):
    """Plain SGD at a negligible learning rate (the weights stay put, so the runs stay comparable),
    no clipping: at every fp16 step that did not overflow, the gradient statistics -- per
    parameter and through the probes -- equal the fp32 run's, not 2¹⁶ times them."""
    common = ["+experiment=vit_softmax", "optimizer=sgd", "optimizer.learning_rate=1e-9", "trainer.grad_clip=null",
              "trainer.max_steps=4", "trainer.log_every=1", "diagnostics=full", "diagnostics.every_n_steps=1",
              "data.batch_size=32"]  # fmt: skip
    rows = {}
    for precision in ("fp32", "fp16"):
        train(tmp_path / precision, *common, f"trainer.precision={precision}")
        rows[precision] = pd.read_parquet(tmp_path / precision / "metrics.parquet").set_index("step")
    grads = [c for c in rows["fp32"].columns if c.startswith("grad/") or "/grad_norm_mean" in c]
    assert any(c.startswith("grad/") for c in grads) and any(c.startswith("resid/") for c in grads)
    finite = [step for step in rows["fp16"].index if np.isfinite(rows["fp16"].loc[step, grads].astype(float)).all()]
    assert 4 in finite  # the loss scale backs off after an overflow: the last step is finite
    for step in finite:
        for column in grads:
            ours, reference = rows["fp16"].loc[step, column], rows["fp32"].loc[step, column]
            assert ours == pytest.approx(reference, rel=0.05, abs=1e-6), (step, column)
