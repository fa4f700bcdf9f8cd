"""Compile every FlashSigmoid kernel for sm_80 and sm_90 without a GPU and report its cost.

    python scripts/inspect_kernels.py                    # the table (about 10 minutes on 2 cores)
    python scripts/inspect_kernels.py --arch 90 --dtype bf16 --head-dim 128 --variant base
    python scripts/inspect_kernels.py --json             # one JSON object per compiled kernel
    python scripts/inspect_kernels.py --arch 90 --dtype bf16 --head-dim 128 --smallest   # every variant, quickly

For each kernel (forward, backward dQ, backward dK/dV), architecture, dtype, head dim, variant
(causal, window, ALiBi, varlen, bias gradient, softcap, dropout, paged KV cache with pages of
256 and of 768 tokens, S_dmask) and autotune config that the launcher's prune rule keeps,
Triton compiles ahead of time (`triton.compile` with a `GPUTarget`; ptxas and cuobjdump ship in
the Triton wheel) and the SASS is read: registers, spill stores/loads (STL/LDL instructions) in
the whole kernel and inside its loops (where they cost on every key or query block, not once
per program), shared memory (and whether it fits the architecture), MUFU (special-function
unit) instructions per attention element in the hot loop, FP32 ALU instructions per element
there, and tensor-core instructions (HGMMA on sm_90, HMMA on sm_80). Cubins are kept under --out.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from flash_sigmoid import triton_kernels as tk

KERNELS = {"fwd": tk.fwd_kernel, "bwd_dq": tk.bwd_dq_kernel, "bwd_dkdv": tk.bwd_dkdv_kernel}
SHARED_LIMIT = {80: 166912, 90: 232448}  # bytes per block with opt-in (CUDA programming guide)
VARIANTS = {  # constexpr flags beyond the defaults; each applies to the kernels listed
    "base": ({}, KERNELS),
    "causal": ({"CAUSAL": True}, KERNELS),
    "window": ({"HAS_WINDOW": True}, KERNELS),
    "alibi": ({"CAUSAL": True, "HAS_ALIBI": True}, KERNELS),
    "varlen": ({"CAUSAL": True, "IS_VARLEN": True}, KERNELS),
    "dbias": ({"NEED_DBIAS": True}, ["bwd_dq"]),
    "softcap": ({"SOFTCAP": True}, KERNELS),
    "dropout": ({"DROPOUT": True}, KERNELS),
    "kvcache_paged": ({"CAUSAL": True, "KV_CACHE": True, "PAGE_SIZE": 256}, ["fwd"]),
    "kvcache_paged_768": ({"CAUSAL": True, "KV_CACHE": True, "PAGE_SIZE": 768}, ["fwd"]),
    "attn_probs": ({"CAUSAL": True, "RETURN_PROBS": True}, ["fwd"]),
}
DTYPES = {"fp16": "fp16", "bf16": "bf16"}
POINTERS = {"Mass": "fp32", "Probs": "fp32", "Bias": "fp32", "Alibi": "fp32", "DBias": "fp32", "CuQ": "i32",
            "CuK": "i32", "BlockTable": "i32", "KvBatch": "i32"}  # fmt: skip
FLOATS, INT64 = {"scale2", "cap", "dropout_p"}, {"seed"}
ALU = r"\b(FFMA|FMUL|FADD|FMNMX|FSEL|FSETP|IADD3|IMAD|LOP3|SHF|F2FP|ISETP|SEL)"  # FP32 and integer pipes


def block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def configs_for(kernel: str, arch: int, head_dim: int):
    """The autotune configs the launcher keeps for this kernel on this architecture (its own
    prune rule, given the architecture's shared memory)."""
    return tk.keep_configs(kernel, tk.autotune_configs(), block_d(head_dim), 2, SHARED_LIMIT[arch])


def _signature(fn, dtype: str, constants: dict):
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constants:
            sig[name] = "constexpr"
        elif name[0].isupper():  # pointers: 16-byte aligned, as torch allocates
            sig[name] = "*" + POINTERS.get(name, dtype)
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in FLOATS:
            sig[name] = "fp32"
        else:
            sig[name] = "i64" if name in INT64 else "i32"
            if name.startswith("s") and name != "seed":  # strides of real layouts are multiples of 16
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


def _hot_loop(sass: str, pattern: str) -> int:
    """Matches of `pattern` in the innermost loop that has the most: loops are backward branches
    (a kernel's key or query blocks; the dK/dV kernel's loop over a GQA group's heads encloses
    them)."""
    lines = [(int(m.group(1), 16), m.group(2)) for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+(.*?);", sass)]
    loops = []
    for addr, text in lines:
        jump = re.search(r"\bBRA\s+0x([0-9a-f]+)", text)
        if jump and int(jump.group(1), 16) < addr:
            loops.append((int(jump.group(1), 16), addr))
    innermost = [(a, b) for a, b in loops if not any(a <= c and d <= b and (c, d) != (a, b) for c, d in loops)]
    counts = [sum(1 for addr, text in lines if a <= addr <= b and re.search(pattern, text)) for a, b in innermost]
    return max(counts, default=0)


def inspect(job: dict) -> dict:
    """Compile one kernel variant and read its cost from the cubin."""
    kernel, arch, dtype, head_dim, variant, config, out_dir = (job[k] for k in
                                                                 ("kernel", "arch", "dtype", "head_dim", "variant",
                                                                  "config", "out"))  # fmt: skip
    fn = KERNELS[kernel].fn
    flags = {"HEAD_DIM": head_dim, "BLOCK_D": block_d(head_dim), "CAUSAL": False,
             "HAS_WINDOW": False, "HAS_ALIBI": False, "IS_VARLEN": False, "SOFTCAP": False, "DROPOUT": False,
             "KV_CACHE": False, "PAGE_SIZE": 0, "RETURN_MASS": False, "RETURN_PROBS": False, "NEED_DBIAS": False,
             "FAST": True, "UPCAST": False, "IEEE": False, "H": 16, "HK": 16, "GROUP": 1, **VARIANTS[variant][0],
             "BLOCK_M": config["BLOCK_M"], "BLOCK_N": config["BLOCK_N"]}  # fmt: skip
    constants = {k: v for k, v in flags.items() if k in fn.arg_names}
    sig, attrs = _signature(fn, dtype, constants)
    options = {"num_warps": config["num_warps"], "num_stages": config["num_stages"]}
    compiled = triton.compile(ASTSource(fn, sig, constants, attrs), target=GPUTarget("cuda", arch, 32), options=options)
    name = f"{kernel}_sm{arch}_{dtype}_d{head_dim}_{variant}_{config['BLOCK_M']}x{config['BLOCK_N']}" \
           f"_w{config['num_warps']}_s{config['num_stages']}"  # fmt: skip
    cubin = Path(out_dir) / f"{name}.cubin"
    cubin.write_bytes(compiled.asm["cubin"])
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    sass = subprocess.run([str(tools / "cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True).stdout
    usage = subprocess.run([str(tools / "cuobjdump"), "-res-usage", str(cubin)], capture_output=True, text=True).stdout
    per_thread = config["BLOCK_M"] * config["BLOCK_N"] / (32 * config["num_warps"])  # elements per loop trip
    mufu = _hot_loop(sass, r"\bMUFU\.")
    return {
        "kernel": kernel, "arch": f"sm_{arch}", "dtype": dtype, "head_dim": head_dim, "variant": variant,
        "block_m": config["BLOCK_M"], "block_n": config["BLOCK_N"], "num_warps": config["num_warps"],
        "num_stages": config["num_stages"], "registers": int(re.search(r"REG:(\d+)", usage).group(1)),
        "spill_stores": len(re.findall(r"\bSTL", sass)), "spill_loads": len(re.findall(r"\bLDL", sass)),
        "loop_spills": _hot_loop(sass, r"\b(STL|LDL)"),
        "shared_bytes": compiled.metadata.shared, "fits": compiled.metadata.shared <= SHARED_LIMIT[arch],
        "mufu": mufu, "mufu_per_element": round(mufu / per_thread, 3),
        "alu_per_element": round(_hot_loop(sass, ALU) / per_thread, 2),
        "tensor_core": len(re.findall(r"\bHGMMA|\bHMMA", sass)), "cubin": str(cubin),
    }  # fmt: skip


def jobs(args) -> list[dict]:
    out = []
    for arch, dtype, head_dim, variant in itertools.product(args.arch, args.dtype, args.head_dim, args.variant):
        for kernel in VARIANTS[variant][1]:
            kept = configs_for(kernel, arch, head_dim)
            if args.smallest:
                kept = [min(kept, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] * c.num_stages)]
            for c in kept:
                config = {**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages}
                out.append(dict(kernel=kernel, arch=arch, dtype=dtype, head_dim=head_dim, variant=variant,
                                config=config, out=str(args.out)))  # fmt: skip
    return out


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=[80, 90])
    parser.add_argument("--dtype", nargs="+", default=["fp16", "bf16"], choices=list(DTYPES))
    parser.add_argument("--head-dim", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--variant", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--smallest", action="store_true", help="only each kernel's smallest kept config")
    parser.add_argument("--jobs", type=int, default=os.cpu_count(), help="parallel compilations")
    parser.add_argument("--out", type=Path, default=Path("outputs/kernels"), help="where cubins are kept")
    parser.add_argument("--json", action="store_true", help="one JSON object per kernel instead of the table")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    todo = jobs(args)
    from tqdm import tqdm

    with ProcessPoolExecutor(args.jobs) as pool:
        rows = list(tqdm(pool.map(inspect, todo), total=len(todo), desc="compiling", disable=args.json))
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return rows
    head = (f"{'kernel':9} {'arch':5} {'dtype':5} {'d':>3} {'variant':17} {'tile':>7} {'w':>2} {'s':>2} {'regs':>4} "
            f"{'spill st/ld':>11} {'in loop':>7} {'smem KB':>8} {'MUFU/el':>7} {'ALU/el':>6} {'MMA':>4}")  # fmt: skip
    print(head)
    for r in rows:
        smem = f"{r['shared_bytes'] / 1024:.0f}" + ("" if r["fits"] else "!")
        print(f"{r['kernel']:9} {r['arch']:5} {r['dtype']:5} {r['head_dim']:>3} {r['variant']:17} "
              f"{r['block_m']:>3}x{r['block_n']:<3} {r['num_warps']:>2} {r['num_stages']:>2} {r['registers']:>4} "
              f"{r['spill_stores']:>5}/{r['spill_loads']:<5} {r['loop_spills']:>7} {smem:>8} "
              f"{r['mufu_per_element']:>7.2f} {r['alu_per_element']:>6.1f} {r['tensor_core']:>4}")  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
