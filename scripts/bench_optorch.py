"""Time one AdamW step: optorch vs torch.optim.AdamW(foreach=True), interleaved in one run.

    python scripts/bench_optorch.py [--device cpu|cuda] [--reps 15] [--width 576] [--depth 12]

The parameter set is a ViT-like transformer (~50M parameters over ~200 tensors by default).
Fresh gradients are copied in before every step (untimed) since optorch consumes its input.
Prints the median time of each and the median of per-round ratios (optorch / torch foreach);
`torch fused` is shown for reference.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import optorch


def transformer_shapes(width: int, depth: int, classes: int = 1000) -> dict[str, tuple[int, ...]]:
    shapes = {"patch_embed.weight": (width, 768), "pos_embed": (1, 197, width), "cls_token": (1, 1, width)}
    for i in range(depth):
        for name, shape in {
            "norm1.weight": (width,), "norm1.bias": (width,),
            "attn.qkv.weight": (3 * width, width), "attn.qkv.bias": (3 * width,),
            "attn.proj.weight": (width, width), "attn.proj.bias": (width,),
            "norm2.weight": (width,), "norm2.bias": (width,),
            "mlp.fc1.weight": (4 * width, width), "mlp.fc1.bias": (4 * width,),
            "mlp.fc2.weight": (width, 4 * width), "mlp.fc2.bias": (width,),
            "ls1.gamma": (width,), "ls2.gamma": (width,),
            "attn.q_norm.weight": (width // 12,), "attn.k_norm.weight": (width // 12,),
        }.items():  # fmt: skip
            shapes[f"blocks.{i}.{name}"] = shape
    shapes.update(
        {"norm.weight": (width,), "norm.bias": (width,), "head.weight": (classes, width), "head.bias": (classes,)}
    )
    return shapes


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--reps", type=int, default=15, help="interleaved rounds (after 3 warm-up steps)")
    parser.add_argument("--width", type=int, default=576)
    parser.add_argument("--depth", type=int, default=12)
    args = parser.parse_args()
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    gen = torch.Generator().manual_seed(0)
    shapes = transformer_shapes(args.width, args.depth)
    init = {k: torch.randn(s, generator=gen).to(device) for k, s in shapes.items()}
    grads = {k: torch.randn(s, generator=gen).to(device) * 1e-2 for k, s in shapes.items()}
    n = sum(p.numel() for p in init.values())
    print(f"{n / 1e6:.1f}M parameters in {len(init)} tensors on {device} ({torch.get_num_threads()} threads)")

    hyper = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05)
    contenders = {}
    for name, kw in {"torch foreach": dict(foreach=True), "torch fused": dict(fused=True)}.items():
        params = [p.clone().requires_grad_() for p in init.values()]
        opt = torch.optim.AdamW(params, **hyper, **kw)

        def step(params=params, opt=opt):
            for p, g in zip(params, grads.values()):
                p.grad.copy_(g) if p.grad is not None else setattr(p, "grad", g.clone())
            sync()
            t0 = time.perf_counter()
            opt.step()
            sync()
            return time.perf_counter() - t0

        contenders[name] = step

    params = {k: p.clone() for k, p in init.items()}
    opt = optorch.adamw(hyper["lr"], *hyper["betas"], hyper["eps"], hyper["weight_decay"])
    state = [opt.init(params)]
    buffers = {k: torch.empty_like(g) for k, g in grads.items()}

    def optorch_step():
        torch._foreach_copy_(list(buffers.values()), list(grads.values()))
        sync()
        t0 = time.perf_counter()
        updates, state[0] = opt.update(buffers, state[0], params)
        optorch.apply_updates(params, updates)
        sync()
        return time.perf_counter() - t0

    contenders["optorch"] = optorch_step

    times = {k: [] for k in contenders}
    for r in range(3 + args.reps):
        for name, step in contenders.items():
            t = step()
            if r >= 3:
                times[name].append(t)
    base = times["torch foreach"]
    for name, ts in times.items():
        ratio = statistics.median(t / b for t, b in zip(ts, base))
        print(f"{name:>14}: median {statistics.median(ts) * 1e3:8.1f} ms   ratio vs torch foreach {ratio:.3f}")
    ratio = statistics.median(t / b for t, b in zip(times["optorch"], base))
    print(f"optorch / torch.optim.AdamW(foreach=True) = {ratio:.3f} (goal <= 1.10)")


if __name__ == "__main__":
    main()
