"""torchrun + DDP on CPU (gloo): the same trajectory as one process, only rank 0 writes, and a
2-process checkpoint resumes in 1 process; dropout, accumulation and bf16 resumed exactly under
FSDP2 (tests/e2e/test_parallel.py: accumulation across processes, the rest of FSDP2)."""

import pandas as pd
import pytest
import torch

from attention_simulator.checkpoint import list_checkpoints, load_checkpoint

from ..helpers import run_train, torchrun

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

RUN = ["+experiment=vit_sigmoid", "trainer.max_steps=6", "trainer.log_every=1", "trainer.progress=false"]
NO_REPORT = ["trainer.report=false"]  # the figures, where a test does not look at them
# every statistic of the default diagnostics, recorded at every step: max / min reduce across processes
EVERY_STEP = ["diagnostics.every_n_steps=1"]


def metrics(run_dir, diagnostics=False):
    frame = pd.read_parquet(run_dir / "metrics.parquet").set_index("step")
    columns = ["train/loss", "train/grad_norm", "eval/loss", "eval/accuracy"]
    if diagnostics:
        columns += [
            c
            for c in frame.columns
            if c.startswith(("attn/", "resid/"))
            and "eval_" not in c
            and not c.endswith(("sink_heads", "massive", "kurtosis"))
        ]  # each process's, averaged
    return frame[columns]


def test_ddp_matches_one_process_writes_once_and_resumes_in_one(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    result = torchrun(*RUN, *EVERY_STEP, "data.batch_size=16", "logger.wandb=true", f"hydra.run.dir={two}",
                      cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    result = run_train(*RUN, *EVERY_STEP, *NO_REPORT, "data.batch_size=32", "logger.wandb=false",
                       f"hydra.run.dir={one}", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]

    # 2 processes × 16 is the same global batch as 1 × 32: the same trajectory, to float round-off, and
    # the same statistics over the batch (a max over two processes is the max of their maxima)
    assert any(c.endswith("_max") for c in metrics(one, True)) and any(c.endswith("_min") for c in metrics(one, True))
    pd.testing.assert_frame_equal(metrics(two, True), metrics(one, True), rtol=1e-5)
    assert metrics(two).loc[6, "eval/accuracy"] == metrics(one).loc[6, "eval/accuracy"]  # the whole test split

    # only rank 0 wrote: one run directory, one W&B run, one set of checkpoints and configs
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]
    assert sorted(p.name for p in two.iterdir()) == [".hydra", "checkpoints", "eval_examples.parquet",
                                                     "metrics.parquet", "report", "train.log", "wandb"]  # fmt: skip
    assert len(list((two / "wandb").glob("offline-run-*"))) == 1
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["step_0000006.pt", "step_0000006.pt.sha256"]
    assert result.stdout.count("run dir:") == 1

    # the 2-process checkpoint continues in 1 process exactly as the 1-process run does
    for run_dir in (one, two):
        more = ["trainer.max_steps=8", "data.batch_size=32", "logger.wandb=false", "trainer.resume=auto", *NO_REPORT]
        result = run_train(*RUN, *more, f"hydra.run.dir={run_dir}", cwd=tmp_path)
        assert result.returncode == 0 and "at step 6" in result.stdout + result.stderr, result.stderr[-3000:]
    assert "resuming a 2-process run in 1" in result.stdout + result.stderr
    pd.testing.assert_frame_equal(metrics(two).loc[7:], metrics(one).loc[7:], rtol=1e-5)


def test_fsdp_with_dropout_accumulation_and_bf16_resumes_exactly(tmp_path):
    """Each process draws its own dropout and drop-path masks, and every process's random state is
    in the checkpoint: a sharded bf16 run (FSDP2 on the ViT's blocks, bf16 parameters for compute)
    split over two jobs equals an uninterrupted one, bit for bit."""
    common = [*RUN, *NO_REPORT, "trainer.max_steps=4", "data.batch_size=8", "trainer.grad_accum=2",
              "trainer.precision=bf16", "trainer.parallel=fsdp", "model.drop_path=0.2", "attention.attn_drop=0.1",
              "logger.wandb=false"]  # fmt: skip
    straight, split = tmp_path / "straight", tmp_path / "split"
    for extra, run_dir in (([], straight), (["trainer.run_steps=2"], split), (["trainer.resume=auto"], split)):
        result = torchrun(*common, *extra, f"hydra.run.dir={run_dir}", cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
    pd.testing.assert_frame_equal(metrics(split), metrics(straight), rtol=0, atol=0)
    a, b = (load_checkpoint(list_checkpoints(d / "checkpoints")[-1]) for d in (straight, split))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    rng = a["rng"]  # one state per process, and they differ: each replica drops different units
    assert len(rng) == 2 and not torch.equal(rng[0]["torch"], rng[1]["torch"])


def test_streamed_text_over_two_processes_with_accumulation_resumes_exactly(tmp_path):
    """data.streaming under torchrun: each process streams its own documents, its position is in
    the checkpoint, and a run split over two jobs equals an uninterrupted one, bit for bit; a
    resume with another process count is refused at start-up, naming the count to use."""
    common = ["+experiment=lm_sigmoid", *NO_REPORT, "model=lm_tiny", "data.streaming=true", "data.batch_size=2",
              "data.seq_len=64", "data.eval_max_tokens=1024", "data.eval_seq_lens=[64]", "trainer.grad_accum=2",
              "attention.attn_drop=0.1", "trainer.max_steps=4", "trainer.eval_every=2", "trainer.log_every=1",
              "trainer.progress=false", "diagnostics=off", "task.sample_prompts=[]", "logger.wandb=false"]  # fmt: skip
    straight, split = tmp_path / "straight", tmp_path / "split"
    for extra, run_dir in (([], straight), (["trainer.run_steps=2"], split), (["trainer.resume=auto"], split)):
        result = torchrun(*common, *extra, f"hydra.run.dir={run_dir}", cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
    columns = ["train/loss", "eval/loss"]
    frames = [pd.read_parquet(d / "metrics.parquet").set_index("step")[columns] for d in (straight, split)]
    pd.testing.assert_frame_equal(*frames, rtol=0, atol=0)
    positions = load_checkpoint(list_checkpoints(split / "checkpoints")[-1])["data"]["stream_positions"]
    assert positions == [(0, 0, 4 * 2 * 2 * 64)] * 2  # 4 steps × 2 micro-batches × 2 × 64 tokens of each first document

    result = run_train(*common, "trainer.max_steps=6", "trainer.resume=auto", f"hydra.run.dir={split}", cwd=tmp_path)
    assert result.returncode != 0 and "resume with 2 processes" in result.stdout + result.stderr
