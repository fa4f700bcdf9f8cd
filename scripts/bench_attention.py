"""Benchmark FlashSigmoid against the alternatives, in one run so ratios share conditions.

    python scripts/bench_attention.py                 # GPU if present, else CPU
    python scripts/bench_attention.py --device cpu --seqs 1024 2048 4096 8192

CPU: FlashSigmoid's chunked path vs naive sigmoid (the materialised matrix), forward+backward
time (interleaved repetitions, median) and peak memory (RSS high-water mark of a fresh process
per measurement, minus the inputs), fp32, 8 heads, head dim 64.
GPU: forward, backward and forward+backward TFLOPS (FLOPs = 4·B·H·Tq·Tk·D, halved when causal;
backward 2.5× forward) for FlashSigmoid, flash-attn (if installed), PyTorch SDPA (flash
backend, softmax) and naive sigmoid, bf16, head dims 64 and 128, causal and full.
Writes a CSV and a PNG next to --out.
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from flash_sigmoid import flash_attn_func
from flash_sigmoid.reference import reference_attention


def contenders(device: str) -> dict:
    def flash_sigmoid(q, k, v, causal):
        return flash_attn_func(q, k, v, causal=causal, sigmoid_bias=-math.log(k.shape[1]))

    def naive_sigmoid(q, k, v, causal):
        out, _ = reference_attention(q, k, v, scale=q.shape[-1] ** -0.5, bias=-math.log(k.shape[1]), causal=causal)
        return out

    found = {"flash_sigmoid": flash_sigmoid, "naive_sigmoid": naive_sigmoid}
    if device == "cuda":

        def sdpa_flash(q, k, v, causal):
            with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), is_causal=causal)

        found["sdpa_flash_softmax"] = sdpa_flash
        try:
            from flash_attn import flash_attn_func as fa2

            found["flash_attn2_softmax"] = lambda q, k, v, causal: fa2(q, k, v, causal=causal)
        except ImportError:
            pass
    return found


def inputs(batch, seq, heads, dim, dtype, device):
    g = torch.Generator(device=device).manual_seed(0)
    return [
        torch.randn(batch, seq, heads, dim, device=device, dtype=dtype, generator=g).requires_grad_() for _ in "qkv"
    ]


def run_once(fn, q, k, v, causal, mode, device) -> float:
    """Seconds for one forward, backward or both."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    out = None
    if mode == "bwd":
        out = fn(q, k, v, causal)
        grad = torch.ones_like(out)
    sync()
    t0 = time.perf_counter()
    if mode != "bwd":
        out = fn(q, k, v, causal)
        grad = torch.ones_like(out)
    if mode != "fwd":
        torch.autograd.grad(out, (q, k, v), grad)
    sync()
    return time.perf_counter() - t0


def flops(batch, seq, heads, dim, causal, mode) -> float:
    forward = 4 * batch * heads * seq * seq * dim / (2 if causal else 1)
    return forward * {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}[mode]


def resident_kib(field: str) -> int:
    """VmRSS (now) or VmHWM (peak) of this process. Unlike ru_maxrss, VmHWM is per address
    space: a child does not inherit its parent's peak."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_child(impl: str, seq: int, args):
    """Print the peak resident memory of one forward+backward minus the memory before it
    (after a tiny warm-up call, so one-off lazy imports do not count as attention memory)."""
    fn = contenders("cpu")[impl]
    run_once(fn, *inputs(1, 16, 2, 8, torch.float32, "cpu"), args.causal, "fwd+bwd", "cpu")
    q, k, v = inputs(args.batch, seq, args.heads, args.head_dims[0], torch.float32, "cpu")
    before = resident_kib("VmRSS")
    run_once(fn, q, k, v, args.causal, "fwd+bwd", "cpu")
    print((resident_kib("VmHWM") - before) / 1024)


def peak_memory_mib(impl: str, seq: int, args) -> float:
    """Run `memory_child` in a fresh process (this one's memory history would pollute it)."""
    shape = [
        "--seqs",
        str(seq),
        "--batch",
        str(args.batch),
        "--heads",
        str(args.heads),
        "--head-dims",
        str(args.head_dims[0]),
    ]
    command = [sys.executable, __file__, "--memory-child", impl, *shape] + (["--causal"] if args.causal else [])
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return float(result.stdout.split()[-1])


def bench_cpu(args, rows):
    fns = contenders("cpu")
    dim = args.head_dims[0]
    for seq in args.seqs:
        q, k, v = inputs(args.batch, seq, args.heads, dim, torch.float32, "cpu")
        times = {name: [] for name in fns}
        for fn in fns.values():
            run_once(fn, q, k, v, args.causal, "fwd+bwd", "cpu")  # warm-up
        for _ in range(args.reps):  # interleaved: both see the same machine state
            for name, fn in fns.items():
                times[name].append(run_once(fn, q, k, v, args.causal, "fwd+bwd", "cpu"))
        memory = {name: peak_memory_mib(name, seq, args) for name in fns}
        base_t, base_m = statistics.median(times["naive_sigmoid"]), memory["naive_sigmoid"]
        for name in fns:
            t = statistics.median(times[name])
            rows.append(dict(device="cpu", impl=name, seq=seq, head_dim=dim, causal=args.causal, mode="fwd+bwd",
                             ms=t * 1e3, peak_mib=memory[name], time_vs_naive=t / base_t,
                             memory_vs_naive=memory[name] / base_m))  # fmt: skip
            print(f"seq {seq:5d} {name:14s} fwd+bwd {t * 1e3:9.1f} ms ({t / base_t:.2f}x naive)  "
                  f"peak {memory[name]:8.1f} MiB ({memory[name] / base_m:.2f}x naive)", flush=True)  # fmt: skip


def bench_gpu(args, rows):
    fns = contenders("cuda")
    for dim in args.head_dims:
        for causal in (False, True):
            for seq in args.seqs:
                batch = max(1, args.tokens // seq)
                q, k, v = inputs(batch, seq, args.heads, dim, torch.bfloat16, "cuda")
                for name, fn in fns.items():
                    if name == "naive_sigmoid" and seq > 8192:
                        continue  # the matrix alone would not fit
                    for mode in ("fwd", "bwd", "fwd+bwd"):
                        for _ in range(3):
                            run_once(fn, q, k, v, causal, mode, "cuda")  # warm-up and autotuning
                        t = statistics.median(run_once(fn, q, k, v, causal, mode, "cuda") for _ in range(args.reps))
                        tflops = flops(batch, seq, args.heads, dim, causal, mode) / t / 1e12
                        rows.append(dict(device=torch.cuda.get_device_name(), impl=name, seq=seq, head_dim=dim,
                                         causal=causal, mode=mode, ms=t * 1e3, tflops=tflops))  # fmt: skip
                        print(f"d{dim} {'causal' if causal else 'full':6s} seq {seq:5d} {name:20s} {mode:7s} "
                              f"{tflops:7.1f} TFLOPS", flush=True)  # fmt: skip


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cpu = rows[0]["device"] == "cpu"
    metrics = ["ms", "peak_mib"] if cpu else ["tflops"]
    fig, axes = plt.subplots(1, len(metrics), figsize=(6 * len(metrics), 4), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for impl in sorted({r["impl"] for r in rows}):
            pts = [r for r in rows if r["impl"] == impl and r["mode"] == "fwd+bwd"]
            if not cpu:
                pts = [r for r in pts if r["head_dim"] == 128 and r["causal"]]
            ax.plot([r["seq"] for r in pts], [r[metric] for r in pts], marker="o", label=impl)
        ax.set(xscale="log", yscale="log", xlabel="sequence length", ylabel=metric, title=f"forward+backward {metric}")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seqs", type=int, nargs="+")
    parser.add_argument("--head-dims", type=int, nargs="+")
    parser.add_argument("--heads", type=int)
    parser.add_argument("--batch", type=int, default=1, help="CPU batch size")
    parser.add_argument("--tokens", type=int, default=16384, help="GPU: batch = tokens // seq")
    parser.add_argument("--causal", action="store_true", help="CPU: causal instead of full attention")
    parser.add_argument("--reps", type=int)
    parser.add_argument("--out", default="bench_attention", help="CSV and PNG path prefix")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    gpu = args.device == "cuda"
    args.seqs = args.seqs or ([512, 1024, 2048, 4096, 8192, 16384] if gpu else [1024, 2048, 4096, 8192])
    args.head_dims = args.head_dims or ([64, 128] if gpu else [64])
    args.heads = args.heads or (16 if gpu else 8)
    args.reps = args.reps or (20 if gpu else 3)
    if args.memory_child:
        return memory_child(args.memory_child, args.seqs[0], args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)  # before measuring, not after
    rows: list[dict] = []
    (bench_gpu if gpu else bench_cpu)(args, rows)
    with open(f"{args.out}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, f"{args.out}.png")
    print(f"wrote {args.out}.csv and {args.out}.png")


if __name__ == "__main__":
    main()
