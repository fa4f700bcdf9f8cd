"""Every CUDA branch, for a machine with a GPU: `python -m pytest -m gpu` (skipped without one).

The Triton kernels against the brute-force reference on the device (flash-attn's window,
rotary, paged-varlen and page-size semantics too), flash-attn's backend when
installed, the trainer in bf16 and fp16 with CUDA random states resumed exactly (streamed text
too), padded
training steps that never synchronise, NCCL with two GPUs (DDP, FSDP2 with context parallelism
and the Triton kernel per ring block), optorch on sharded parameters, and offsets past 2³¹
elements.
"""

import copy
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from attention_simulator.attention import AttentionConfig
from attention_simulator.checkpoint import list_checkpoints
from attention_simulator.models.asr import SpeechRecognizer
from flash_sigmoid import flash_attn_func, flash_attn_varlen_func

from ..attention_simulator.backend_checks import check_backends
from ..flash_sigmoid import feature_checks, semantics_checks
from ..flash_sigmoid.helpers import SHAPES, criterion, make_inputs, reference_run
from ..helpers import train

pytestmark = pytest.mark.gpu
CUDA = ["trainer.device=cuda"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("causal", [False, True])
def test_triton_kernels_on_the_device(shape, causal, dtype):
    b, tq, tk, h, hk, d = shape
    q, k, v = (t.detach().cuda().requires_grad_() for t in make_inputs(b, tq, tk, h, hk, d, dtype))
    bias = torch.linspace(-3.0, 0.5, h, device="cuda").requires_grad_()
    out, mass = flash_attn_func(q, k, v, causal=causal, sigmoid_bias=bias, return_attn_mass=True)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, [q, k, v, bias], dout)
    cpu = [t.detach().cpu() for t in (q, k, v)]
    exact = reference_run(*cpu, bias.detach().cpu(), dout.cpu(), upcast=True, causal=causal)
    lowp = reference_run(*cpu, bias.detach().cpu(), dout.cpu(), upcast=False, causal=causal)
    criterion(out.cpu(), lowp[0], exact[0], "out")
    criterion(mass.cpu(), lowp[1], exact[1], "mass")
    for name, ours, lo, ex in zip(("dq", "dk", "dv", "dbias"), grads, lowp[2], exact[2]):
        criterion(ours.cpu(), lo, ex, name)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fast_sigmoid_at_minus_log_n_on_the_device(dtype):
    """ex2.approx and the Newton reciprocal where p ≈ 1/16384."""
    feature_checks.check_sigmoid_at_minus_log_n("cuda", dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_softcap_on_the_device(dtype):
    feature_checks.check_softcap("cuda", dtype)


def test_dropout_on_the_device():
    feature_checks.check_dropout("cuda")


@pytest.mark.parametrize("paged, num_splits, rotary", [(False, 1, None), (True, 3, True), (True, 0, False)])
def test_kvcache_on_the_device(paged, num_splits, rotary):
    feature_checks.check_kvcache("cuda", paged, num_splits, rotary)


@pytest.mark.parametrize("seqlen_q, seqlen_k, window, causal", semantics_checks.WINDOW_CASES)
def test_flash_attn_windows_on_the_device(seqlen_q, seqlen_k, window, causal):
    semantics_checks.check_windows("cuda", seqlen_q, seqlen_k, window, causal)


def test_varlen_windows_and_attn_probs_from_the_kernel():
    semantics_checks.check_varlen_windows_and_probs("cuda", (1, -1), False)


@pytest.mark.parametrize("page", [16, 24, 768])
def test_paged_varlen_on_the_device(page):
    semantics_checks.check_paged_varlen("cuda", page, causal=True)


@pytest.mark.parametrize("paged, interleaved, causal, window, page", semantics_checks.KVCACHE_CASES)
def test_kvcache_semantics_on_the_device(paged, interleaved, causal, window, page):
    semantics_checks.check_kvcache_semantics("cuda", paged, interleaved, causal, window, page)


def test_torch_compile_on_the_device():
    q, k, v = (t.detach().cuda().requires_grad_() for t in make_inputs(2, 300, 300, 4, 2, 64, torch.bfloat16))
    bias = torch.tensor(-5.0, device="cuda", requires_grad=True)

    def f(q, k, v, bias):
        return flash_attn_func(q, k, v, causal=True, sigmoid_bias=bias, dropout_p=0.1, dropout_seed=3).float().sum()

    eager = torch.autograd.grad(f(q, k, v, bias), [q, bias])
    compiled = torch.autograd.grad(torch.compile(f, fullgraph=True)(q, k, v, bias), [q, bias])
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b)


def test_varlen_kernels_with_rows_past_the_last_sequence():
    """Padded batches pack B·T rows with the real ones first: rows past cu_seqlens[-1] stay 0."""
    q, k, v = (torch.randn(12, 4, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    cu = torch.tensor([0, 5, 9], dtype=torch.int32, device="cuda")
    out = flash_attn_varlen_func(q, k, v, cu, cu, 5, 5, causal=True)
    assert torch.equal(out[9:], torch.zeros_like(out[9:]))
    dq, dk, dv = torch.autograd.grad(out, [q, k, v], torch.randn_like(out))
    for grad in (dq, dk, dv):
        assert torch.equal(grad[9:], torch.zeros_like(grad[9:]))


def test_offsets_past_two_to_the_31_elements():
    """A second sequence 2³¹ elements into its buffer (batch stride 2³¹): int32 offsets would wrap."""
    if torch.cuda.get_device_properties(0).total_memory < 12 * 2**30:
        pytest.skip("needs 12 GB of device memory")
    buffer = torch.randn(2**31 + 64 * 4 * 64, device="cuda", dtype=torch.float16)
    q = buffer.as_strided((2, 64, 4, 64), (2**31, 256, 64, 1))
    k = torch.randn(1, 64, 4, 64, device="cuda", dtype=torch.float16).expand(2, -1, -1, -1).contiguous()
    out = flash_attn_func(q, k, k, sigmoid_bias=-4.0)
    alone = flash_attn_func(q[1:].contiguous(), k[1:], k[1:], sigmoid_bias=-4.0)
    torch.testing.assert_close(out[1:], alone)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_flash_attn_backend_matches_the_brute_force(dtype):
    pytest.importorskip("flash_attn")
    for causal, padded in ((False, False), (True, True)):
        check_backends(["flash_softmax"], causal, None, padded, "alibi", 2, device="cuda", dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_softmax_sinks_on_the_device(dtype):
    """flash_softmax's sink through SDPA's CUDA kernels (an extra key of 8 more channels)."""
    for causal, padded, window in ((False, False, None), (True, True, 3)):
        check_backends(["softmax", "flash_softmax"], causal, window, padded, "rope", 2, device="cuda", dtype=dtype,
                       sink="learned")  # fmt: skip


def straight_and_split(tmp_path, *common: str) -> dict[str, pd.DataFrame]:
    """An 8-step run, and the same run stopped at step 4 and resumed; their losses must agree."""
    train(tmp_path / "straight", *common)
    train(tmp_path / "split", *common, "trainer.run_steps=4")
    train(tmp_path / "split", *common, "trainer.resume=auto")
    rows = {d: pd.read_parquet(tmp_path / d / "metrics.parquet") for d in ("straight", "split")}
    pd.testing.assert_series_equal(rows["straight"]["train/loss"], rows["split"]["train/loss"])
    return rows


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_trainer_on_cuda_resumes_exactly_with_dropout(precision, tmp_path):
    rows = straight_and_split(tmp_path, "+experiment=vit_sigmoid", *CUDA, f"trainer.precision={precision}",
                              "trainer.max_steps=8", "model.drop_path=0.2", "attention.attn_drop=0.1",
                              "data.batch_size=32")  # fmt: skip
    state = torch.load(list_checkpoints(tmp_path / "split" / "checkpoints")[-1], weights_only=True)
    assert state["rng"][0]["cuda"]  # the CUDA generator's state is saved and restored
    assert rows["straight"]["train/loss"].dropna().iloc[-1] < rows["straight"]["train/loss"].dropna().iloc[0]


def test_streamed_text_on_cuda_from_a_loader_worker_resumes_exactly(tmp_path):
    """data.streaming on the device: batches tokenised in a loader worker, pinned, and the stream
    position kept through a split run."""
    straight_and_split(tmp_path, "+experiment=lm_sigmoid", *CUDA, "trainer.precision=bf16", "data.streaming=true",
                       "data.num_workers=1", "data.batch_size=8", "data.seq_len=128", "data.eval_max_tokens=4096",
                       "attention.attn_drop=0.1", "trainer.max_steps=8", "trainer.eval_every=4",
                       "task.sample_prompts=[]")  # fmt: skip
    from attention_simulator.data.text import TextData

    data = TextData(streaming=True, num_workers=1, seq_len=128, batch_size=8)
    batch = next(iter(data.train_loader(seed=0)))
    assert batch["inputs"].is_pinned() and data.position[0] == 0 and sum(data.position[1:]) > 0


@pytest.mark.parametrize("backend", ["softmax", "sigmoid", "flash_softmax", "flash_sigmoid"])
def test_padded_forward_and_backward_do_not_synchronise(backend):
    """The speech model on a right-padded batch: masks, varlen packing and probes never make the
    host wait. (torch's CTC loss copies its length tensors to the host itself: not measured.)"""
    sigmoid = "sigmoid" in backend
    attention = AttentionConfig(backend=backend, sigmoid_bias="auto" if sigmoid else None, position="rope")
    model = SpeechRecognizer(n_mels=80, vocab_size=29, dim=64, depth=2, num_heads=4, attention=attention).cuda()
    features = torch.randn(4, 400, 80, device="cuda")
    lengths = torch.tensor([400, 310, 222, 97], device="cuda")
    model(features, lengths)[0].sum().backward()  # warm-up: allocations, autotuning
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        log_probs, frames = model(features, lengths)
        real = torch.arange(log_probs.shape[1], device="cuda")[None, :] < frames[:, None]
        (log_probs * real[..., None]).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_nccl_two_gpus_match_one(tmp_path):
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    run = ["+experiment=vit_sigmoid", *CUDA, "trainer.max_steps=4", "trainer.log_every=1", "logger.wandb=false"]
    two = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "attention_simulator.train", *run, "data.batch_size=16", f"hydra.run.dir={tmp_path / 'two'}"]  # fmt: skip
    one = [
        sys.executable,
        "-m",
        "attention_simulator.train",
        *run,
        "data.batch_size=32",
        f"hydra.run.dir={tmp_path / 'one'}",
    ]
    for command in (two, one):
        result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
    frames = [pd.read_parquet(tmp_path / d / "metrics.parquet")[["train/loss", "eval/loss"]] for d in ("two", "one")]
    pd.testing.assert_frame_equal(*frames, rtol=1e-4)


def test_sharded_optimizer_updates_on_the_device(tmp_path):
    """optorch on FSDP2 shards on CUDA (a one-process NCCL group): AdamW with clipping equals the
    unsharded model's, where Adam's division runs out of place and is copied into each shard."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import optorch

    dist = torch.distributed
    dist.init_process_group("nccl", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        plain = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 3)).cuda()
        sharded = fully_shard(copy.deepcopy(plain), mesh=init_device_mesh("cuda", (1,)))
        opt = optorch.chain(optorch.clip_by_global_norm(0.1), optorch.adamw(1e-2, weight_decay=0.1))
        runs = [(m, dict(m.named_parameters())) for m in (plain, sharded)]
        states = [opt.init(params) for _, params in runs]
        x = torch.randn(32, 8, device="cuda")
        for _ in range(5):
            for i, (model, params) in enumerate(runs):
                model(x).square().mean().backward()
                updates, states[i] = opt.update({k: p.grad for k, p in params.items()}, states[i], params)
                optorch.apply_updates(params, updates)
                model.zero_grad(set_to_none=True)
        for name, p in runs[0][1].items():
            torch.testing.assert_close(runs[1][1][name].full_tensor(), p, rtol=1e-5, atol=1e-6)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_fsdp_and_context_parallel_on_two_gpus_match_one(tmp_path):
    """lm_sigmoid_long scaled down: NCCL, FSDP2, ring attention with the Triton kernel per block."""
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    run = ["+experiment=lm_sigmoid_long", "data=pydoc", "model=lm_tiny", "data.seq_len=256", "data.eval_seq_lens=[256]",
           "data.eval_max_tokens=16384", "data.batch_size=8", "trainer.max_steps=4", "trainer.log_every=1",
           "trainer.eval_every=0", "logger.wandb=false", "task.sample_prompts=[]", *CUDA]  # fmt: skip
    two = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "attention_simulator.train", *run, "trainer.context_parallel=2",
           f"hydra.run.dir={tmp_path / 'two'}"]  # fmt: skip
    one = [sys.executable, "-m", "attention_simulator.train", *run, "trainer.parallel=ddp",
           "trainer.context_parallel=1", f"hydra.run.dir={tmp_path / 'one'}"]  # fmt: skip
    for command in (two, one):
        result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "two" / "checkpoints" / "step_0000004.dcp" / ".metadata").is_file()
    frames = [pd.read_parquet(tmp_path / d / "metrics.parquet")[["train/loss", "eval/loss"]] for d in ("two", "one")]
    pd.testing.assert_frame_equal(*frames, rtol=2e-2)  # bf16: the same run, rounded differently


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_memory_benchmark_on_two_gpus():
    script = Path(__file__).resolve().parents[2] / "scripts" / "bench_memory.py"
    result = subprocess.run([sys.executable, str(script), "--model", "lm_tiny", "--seq-len", "1024"],
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "peak allocated (CUDA)" in result.stdout
