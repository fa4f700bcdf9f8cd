"""FSDP2, sharded (DCP) checkpoints and context parallelism under torchrun on CPU (gloo): each
reproduces one process training on the same global batch."""

import pandas as pd
import pytest

from attention_simulator.checkpoint import list_checkpoints

from ..helpers import ONE_THREAD, run_train, torchrun

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

LM = ["+experiment=lm_sigmoid", "data.seq_len=64", "data.eval_seq_lens=[64]", "data.eval_max_tokens=4096",
      "trainer.log_every=1", "trainer.eval_every=0", "trainer.progress=false", "logger.wandb=false",
      "task.sample_prompts=[]", "trainer.report=false"]  # fmt: skip
# every statistic, every step: parameter, gradient, update and optimizer-state norms must be the full parameters'
FULL = ["diagnostics=full", "diagnostics.every_n_steps=1"]


def table(run_dir, prefixes=(), skip=()):
    frame = pd.read_parquet(run_dir / "metrics.parquet").set_index("step")
    columns = ["train/loss", "train/grad_norm", "train/grad_norm_clipped", "eval/loss", "eval/bits_per_byte"]
    # (not eval_*: the first evaluation batch each process records differs with the process count)
    columns += [c for c in frame.columns if c.startswith(prefixes) and "/eval_" not in c and not c.endswith(skip)]
    return frame[columns]


def assert_same_training(run_dir, reference_dir, prefixes, skip=()):
    """Losses, global gradient norms and evaluation to 1e-5; per-parameter and optimizer-state
    norms and per-layer statistics (each a small sum, taken in another order) to 1e-4; the
    statistics named in `skip` are left out."""
    pd.testing.assert_frame_equal(table(run_dir), table(reference_dir), rtol=1e-5)
    detail = table(run_dir, prefixes, skip)
    reference = table(reference_dir, prefixes, skip)
    assert sorted(detail.columns) == sorted(reference.columns) and len(detail.columns) > 5 + 20
    pd.testing.assert_frame_equal(detail, reference[detail.columns], rtol=1e-4)


def ok(result):
    assert result.returncode == 0, result.stderr[-3000:]
    return result


COMMON = [*LM, *FULL, "trainer.max_steps=10"]
PER_PROCESS = ("sink_heads", "massive", "kurtosis")  # each process's, averaged: not the one process's
STATE = ("param/", "grad/", "update/", "opt/")


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The reference: 1 process, 16 sequences per step, 10 steps, every statistic at every step."""
    run_dir = tmp_path_factory.mktemp("parallel") / "one"
    ok(run_train(*COMMON, "data.batch_size=16", f"hydra.run.dir={run_dir}", cwd=run_dir.parent, env_extra=ONE_THREAD))
    return run_dir


def test_fsdp_and_ddp_with_accumulation_match_one_process(one_process, tmp_path):
    """fsdp and ddp, each 2 processes × 2 micro-batches of 4 = 1 process × 16: the same 16
    sequences per step, so the same losses, gradient norms, parameter and optimizer-state norms."""
    for mode in ("fsdp", "ddp"):
        ok(torchrun(*COMMON, f"trainer.parallel={mode}", "data.batch_size=4", "trainer.grad_accum=2",
                    f"hydra.run.dir={tmp_path / mode}", cwd=tmp_path))  # fmt: skip
    one = table(one_process, STATE)
    assert any(c.startswith("opt/exp_avg_sq/") for c in one) and any(c.startswith("update/") for c in one)
    assert len(one.dropna(subset=["train/loss"])) == 10
    examples = pd.read_parquet(one_process / "eval_examples.parquet")  # one row per validation sequence
    for mode in ("fsdp", "ddp"):
        assert_same_training(tmp_path / mode, one_process, STATE)
        theirs = pd.read_parquet(tmp_path / mode / "eval_examples.parquet")  # gathered from both processes
        assert len(theirs) == len(examples)
        pd.testing.assert_series_equal(theirs.drop(columns="split").sum(), examples.drop(columns="split").sum(),
                                       rtol=1e-5)  # fmt: skip


def test_sharded_checkpoint_resumes_at_one_and_two_processes(one_process, tmp_path):
    """fsdp × 2 for 3 steps, then 1 process for 3 (from the sharded checkpoint, writing a
    single-file one), then fsdp × 2 again from that file: the same run as 10 uninterrupted steps
    in one process (16 sequences per step throughout: the data position counts global batches)."""
    split = tmp_path / "split"
    ok(torchrun(*COMMON, "trainer.parallel=fsdp", "data.batch_size=8", "trainer.run_steps=3",
                f"hydra.run.dir={split}", cwd=tmp_path))  # fmt: skip
    result = ok(run_train(*COMMON, "data.batch_size=16", "trainer.run_steps=3", "trainer.resume=auto",
                          f"hydra.run.dir={split}", cwd=tmp_path, env_extra=ONE_THREAD))  # fmt: skip
    assert "at step 3" in result.stdout + result.stderr
    ok(torchrun(*COMMON, "trainer.parallel=fsdp", "data.batch_size=8", "trainer.resume=auto",
                f"hydra.run.dir={split}", cwd=tmp_path))  # fmt: skip
    assert_same_training(split, one_process, (*STATE, "attn/"), skip=PER_PROCESS)
    assert [p.name for p in list_checkpoints(split / "checkpoints")] == ["step_0000006.pt", "step_0000010.dcp"]
    # each process wrote its shards of the sharded checkpoint
    assert len(list((split / "checkpoints" / "step_0000010.dcp").glob("*.distcp"))) == 2


def test_long_context_preset_with_context_parallel_matches_one_process(tmp_path):
    """lm_sigmoid_long scaled down to CPU: each of 2 processes holds half of every sequence (ring
    attention with the FlashSigmoid kernel per block, RoPE at global positions, b = −log of the
    whole length), sharded with fsdp, blocks recomputed in backward: the same training as one
    process without any of it."""
    common = ["+experiment=lm_sigmoid_long", "data=pydoc", "model=lm_tiny", *LM[1:], *FULL, "trainer.max_steps=5",
              "data.batch_size=8", "trainer.precision=fp32", "trainer.checkpoint_every=0"]  # fmt: skip
    two = ["trainer.context_parallel=2"]
    ok(torchrun(*common, *two, f"hydra.run.dir={tmp_path / 'cp'}", cwd=tmp_path))
    ok(run_train(*common, "trainer.parallel=ddp", "trainer.context_parallel=1", "model.activation_checkpointing=false",
                 f"hydra.run.dir={tmp_path / 'one'}", cwd=tmp_path, env_extra=ONE_THREAD))  # fmt: skip
    prefixes = ("param/", "grad/", "opt/", "attn/", "resid/")
    assert any(c.startswith("attn/") and c.endswith("mass_mean") for c in table(tmp_path / "one", prefixes))
    # the largest attention logit and the sink shares are not recorded under context parallelism (docs/diagnostics.md)
    assert_same_training(tmp_path / "cp", tmp_path / "one", prefixes, skip=("logit_max", "sink_mass", *PER_PROCESS))
    # per-sequence sums of the final evaluation: each cp group adds up its halves of every sequence
    examples = [pd.read_parquet(tmp_path / run / "eval_examples.parquet") for run in ("cp", "one")]
    pd.testing.assert_frame_equal(*examples, rtol=1e-5)
