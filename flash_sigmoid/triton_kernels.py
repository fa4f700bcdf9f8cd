"""FlashSigmoid Triton kernels (forward, backward) and their launchers.

Sigmoid attention needs no running max, no row sum and no log-sum-exp: each key block's
contribution σ(s)·v is final when computed. The forward is one pass over the visible key
blocks; the backward recomputes p and uses dS = p(1 − p)·dP — no preprocessing kernel.
Backward runs as two deterministic kernels (no atomics): one per key block for dK, dV (summing
the query heads of a GQA group), one per query block for dQ and the bias gradient. The bias is
a contiguous fp32 [batch, heads] table (per head, or per sequence and head).

Layouts: padded [B, T, H, D] or packed varlen [total, H, D] with cu_seqlens; the kernels see
both through (batch stride, token stride, head stride) and per-sequence start offsets. The
forward also reads a KV cache (a (first token, length) table per sequence, a batch-index map,
pages through a block table) and may take one slice of the key blocks per program (split-KV:
the launcher adds the slices). Options are constexprs (causal, window, ALiBi, varlen, softcap,
dropout, KV cache), so each variant compiles to its own kernel; the element-wise pipeline lives
in `tiles.py`. Import this module only after TRITON_INTERPRET is decided: Triton fixes the mode
at decoration.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from .tiles import (
    LOG2E,
    dropout_keep,
    head_terms,
    key_range,
    load_rows,
    load_tile,
    query_range,
    row_offsets,
    seq_bounds,
    store_tile,
    tile_cast,
    tile_dot,
    tile_probs,
)

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def autotune_configs():
    if INTERPRET:  # the interpreter runs on numpy: one small tile keeps it fast
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=1, num_stages=1)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm, bn, w, s in [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 4), (128, 32, 4, 4), (64, 32, 4, 2)]
    ]


# (kernel, BLOCK_D) -> the (BLOCK_M, BLOCK_N, num_warps, num_stages) whose SASS spills registers
# inside the key/query loop on sm_80 or sm_90 (`python scripts/inspect_kernels.py --head-dim 64
# 128 256 --dtype bf16 --variant base`, the "in loop" column): a tile spilling there pays
# local-memory traffic on every block it visits, while short autotuning runs may still time it
# fastest. Spills outside the loop (once per program) are kept.
LOOP_SPILLS = {
    ("bwd_dq", 64): {(128, 64, 4, 3), (128, 128, 8, 3)},
    ("bwd_dkdv", 64): {(128, 64, 4, 3), (128, 128, 8, 3)},
    ("fwd", 128): {(128, 64, 4, 3)},
    ("bwd_dq", 128): {(128, 64, 4, 3), (128, 32, 4, 4)},
    ("bwd_dkdv", 128): {(128, 64, 4, 3), (64, 64, 4, 4)},
    ("fwd", 256): {(128, 32, 4, 4)},
    ("bwd_dkdv", 256): {(64, 32, 4, 2)},  # the only tile that fits: kept (see keep_configs)
}


def shared_bytes(kernel: str, config, block_d: int, elem_bytes: int) -> int:
    """Shared memory a config needs, from above: its streamed operand tiles (num_stages copies
    of K and V — of Q and dO for dK/dV) and the tiles held for the whole loop. Exact for the
    forward and dQ kernels as compiled by Triton 3.9, an over-estimate for dK/dV."""
    bm, bn = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
    streamed, held = {"fwd": (2 * bn, bm), "bwd_dq": (2 * bn, 2 * bm), "bwd_dkdv": (2 * bm, 2 * bn)}[kernel]
    return (config.num_stages * streamed + held) * block_d * elem_bytes


@functools.cache
def _device_shared_limit() -> int:
    from triton.runtime import driver

    return driver.active.utils.get_device_properties(driver.active.get_current_device())["max_shared_mem"]


def keep_configs(kernel: str, configs, block_d: int, elem_bytes: int, limit: int):
    """The configs whose shared memory fits `limit` bytes, less those that spill in the loop
    (LOOP_SPILLS) unless nothing else fits; the smallest tile if none fits at all."""
    fits = [c for c in configs if shared_bytes(kernel, c, block_d, elem_bytes) <= limit]
    spills = LOOP_SPILLS.get((kernel, block_d), set())
    clean = [c for c in fits if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) not in spills]
    return clean or fits or [min(configs, key=lambda c: shared_bytes(kernel, c, block_d, elem_bytes))]


def _pruner(kernel: str):
    def prune(configs, named_args, **kwargs):
        if INTERPRET:
            return configs
        elem = named_args["Q"].element_size()
        return keep_configs(kernel, configs, kwargs.get("BLOCK_D", named_args.get("BLOCK_D")), elem,
                            _device_shared_limit())  # fmt: skip

    return {"early_config_prune": prune}


_KEY = ["BLOCK_D", "CAUSAL", "HAS_WINDOW", "HAS_ALIBI", "IS_VARLEN", "SOFTCAP", "DROPOUT"]  # and tensor dtypes
_FWD_KEY = _KEY + ["KV_CACHE", "PAGE_SIZE", "RETURN_PROBS"]


@triton.jit
def _key_rows(K, V, BlockTable, b, kv_b, k_start, offs_n, k_len, skb, skt, svb, svt, sbt,
              KV_CACHE: tl.constexpr, PAGE_SIZE: tl.constexpr):  # fmt: skip
    """Row offsets of keys `offs_n` in K and in V. A KV cache reads batch row kv_b from token
    k_start on, or, paged (PAGE_SIZE > 0), token t from page block_table[b, t // PAGE_SIZE]. The
    page size is a compile-time constant: a power of two divides by a shift, any other size by a
    multiply-high, where a division by a runtime value would cost a MUFU.RCP per key."""
    if KV_CACHE:
        pos = (k_start + offs_n).to(tl.int64)
        if PAGE_SIZE > 0:
            page = tl.load(BlockTable + b.to(tl.int64) * sbt + pos // PAGE_SIZE, mask=offs_n < k_len, other=0)
            page, row = page.to(tl.int64), pos % PAGE_SIZE
            return page * skb + row * skt, page * svb + row * svt
        else:
            return kv_b.to(tl.int64) * skb + pos * skt, kv_b.to(tl.int64) * svb + pos * svt
    else:
        return row_offsets(b, k_start, offs_n, skb, skt), row_offsets(b, k_start, offs_n, svb, svt)


@triton.jit
def _store_probs(Probs, p, pid_bh, offs_m, offs_n, spb, spm, q_len, k_len):
    """The tile's attention weights into the [batch·heads, max_q, max_k] probabilities buffer."""
    where = Probs + pid_bh.to(tl.int64) * spb + offs_m.to(tl.int64)[:, None] * spm + offs_n[None, :]
    tl.store(where, p, mask=(offs_m < q_len)[:, None] & (offs_n < k_len)[None, :])


@triton.jit
def _span(phase: tl.constexpr, lo, mid_lo, mid_hi, hi):
    """The blocks of loop phase 0 (masked edge), 1 (interior, unmasked) or 2 (masked edge)."""
    if phase == 0:
        return lo, mid_lo
    elif phase == 1:
        return mid_lo, mid_hi
    else:
        return mid_hi, hi


@triton.autotune(configs=autotune_configs(), key=_FWD_KEY, prune_configs_by=_pruner("fwd"))
@triton.jit
def fwd_kernel(
    Q, K, V, Out, Mass, Probs, Bias, Alibi, CuQ, CuK, BlockTable, KvBatch,
    sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sob, sot, soh, sos, smb, smh, smt, sms, sab, sbt, spb, spm,
    seqlen_q, seqlen_k, num_splits, scale2, cap, win_left, win_right, seed, dropout_p,
    H: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_ALIBI: tl.constexpr, IS_VARLEN: tl.constexpr,
    SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr, KV_CACHE: tl.constexpr, PAGE_SIZE: tl.constexpr,
    RETURN_MASS: tl.constexpr, RETURN_PROBS: tl.constexpr, FAST: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid_m, pid_bh, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, h = pid_bh // H, pid_bh % H
    hk = h // GROUP
    q_start, q_len = seq_bounds(CuQ, b, seqlen_q, IS_VARLEN)
    if KV_CACHE:  # CuK holds (first token, length) per sequence
        k_start, k_len = tl.load(CuK + 2 * b), tl.load(CuK + 2 * b + 1)
    else:
        k_start, k_len = seq_bounds(CuK, b, seqlen_k, IS_VARLEN)
    kv_b = tl.load(KvBatch + b) if KV_CACHE else b
    start_m = pid_m * BLOCK_M
    if start_m >= q_len:
        return
    diag = k_len - q_len
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = load_tile(Q, b, q_start, offs_m, h, sqb, sqt, sqh, q_len, offs_d, HEAD_DIM)
    bias2, slope2 = head_terms(Bias, Alibi, pid_bh, b, h, sab, HAS_ALIBI)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    mass = tl.zeros([BLOCK_M], dtype=tl.float32)
    lo, mid_lo, mid_hi, hi = key_range(start_m, diag, k_len, win_left, win_right, BLOCK_M, BLOCK_N, CAUSAL,
                                        HAS_WINDOW)  # fmt: skip
    # split-KV: this program takes one slice of the key blocks; the launcher adds the slices' outputs
    chunk = tl.cdiv(tl.cdiv(seqlen_k, num_splits), BLOCK_N) * BLOCK_N
    first = tl.maximum(lo, split * chunk)
    last = tl.maximum(tl.minimum(hi, split * chunk + chunk), first)
    lo, mid_lo, mid_hi, hi = first, tl.minimum(tl.maximum(mid_lo, first), last), tl.minimum(mid_hi, last), last
    mid_hi = tl.maximum(mid_hi, mid_lo)
    for phase in tl.static_range(3):  # masked edge, interior (no mask evaluated), masked edge
        begin, end = _span(phase, lo, mid_lo, mid_hi, hi)
        for start_n in range(begin, end, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            k_rows, v_rows = _key_rows(K, V, BlockTable, b, kv_b, k_start, offs_n, k_len, skb, skt, svb, svt, sbt,
                                       KV_CACHE, PAGE_SIZE)  # fmt: skip
            k = load_rows(K, k_rows, hk, skh, offs_n < k_len, offs_d, HEAD_DIM)
            v = load_rows(V, v_rows, hk, svh, offs_n < k_len, offs_d, HEAD_DIM)
            p, _ = tile_probs(q, k, offs_m, offs_n, scale2, bias2, slope2, cap, diag, k_len, win_left, win_right,
                          phase != 1, CAUSAL, HAS_WINDOW, HAS_ALIBI, SOFTCAP, FAST, UPCAST, IEEE)  # fmt: skip
            if RETURN_MASS:
                mass += tl.sum(p, axis=1)
            if DROPOUT:  # scaled by 1 / (1 − dropout_p) once, at the end
                keep = dropout_keep(seed, pid_bh, offs_m, start_n, seqlen_q, seqlen_k, dropout_p, BLOCK_N)
                if RETURN_PROBS:  # flash-attn's S_dmask: p, negated where dropout dropped it
                    _store_probs(Probs, tl.where(keep, p, -p), pid_bh, offs_m, offs_n, spb, spm, q_len, k_len)
                p = tl.where(keep, p, 0.0)
            elif RETURN_PROBS:
                _store_probs(Probs, p, pid_bh, offs_m, offs_n, spb, spm, q_len, k_len)
            acc += tile_dot(tile_cast(p, v.dtype, UPCAST), v, UPCAST, IEEE)
    if DROPOUT:
        acc = acc * (1.0 / (1.0 - dropout_p))
    Out += split.to(tl.int64) * sos
    store_tile(Out, tile_cast(acc, Out.dtype.element_ty, UPCAST), b, q_start, offs_m, h, sob, sot, soh, q_len, offs_d,
                HEAD_DIM)  # fmt: skip
    if RETURN_MASS:
        rows = offs_m.to(tl.int64) + q_start
        where = Mass + split.to(tl.int64) * sms + b.to(tl.int64) * smb + h.to(tl.int64) * smh + rows * smt
        tl.store(where, mass, mask=offs_m < q_len)


@triton.jit
def _ds(p, dp, keep, inv_keep, DROPOUT: tl.constexpr):
    """dS = p(1 − p)·dP, with dP through the dropout pattern: the gradient of s (and of the bias)."""
    if DROPOUT:
        dp = tl.where(keep, dp * inv_keep, 0.0)
    return (p - p * p) * dp


@triton.autotune(configs=autotune_configs(), key=_KEY, prune_configs_by=_pruner("bwd_dq"), reset_to_zero=["DBias"])
@triton.jit
def bwd_dq_kernel(
    Q, K, V, DO, DQ, DBias, Bias, Alibi, CuQ, CuK,
    sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sdob, sdot, sdoh, sdqb, sdqt, sdqh, sab, sdb_row,
    seqlen_q, seqlen_k, scale2, cap, win_left, win_right, seed, dropout_p,
    H: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_ALIBI: tl.constexpr, IS_VARLEN: tl.constexpr,
    SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr, NEED_DBIAS: tl.constexpr, FAST: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // H, pid_bh % H
    hk = h // GROUP
    q_start, q_len = seq_bounds(CuQ, b, seqlen_q, IS_VARLEN)
    k_start, k_len = seq_bounds(CuK, b, seqlen_k, IS_VARLEN)
    start_m = pid_m * BLOCK_M
    if start_m >= q_len:
        return
    diag = k_len - q_len
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = load_tile(Q, b, q_start, offs_m, h, sqb, sqt, sqh, q_len, offs_d, HEAD_DIM)
    do = load_tile(DO, b, q_start, offs_m, h, sdob, sdot, sdoh, q_len, offs_d, HEAD_DIM)
    bias2, slope2 = head_terms(Bias, Alibi, pid_bh, b, h, sab, HAS_ALIBI)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dbias = tl.zeros([BLOCK_M], dtype=tl.float32)
    lo, mid_lo, mid_hi, hi = key_range(start_m, diag, k_len, win_left, win_right, BLOCK_M, BLOCK_N, CAUSAL,
                                        HAS_WINDOW)  # fmt: skip
    for phase in tl.static_range(3):
        begin, end = _span(phase, lo, mid_lo, mid_hi, hi)
        for start_n in range(begin, end, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            k = load_tile(K, b, k_start, offs_n, hk, skb, skt, skh, k_len, offs_d, HEAD_DIM)
            v = load_tile(V, b, k_start, offs_n, hk, svb, svt, svh, k_len, offs_d, HEAD_DIM)
            p, dcap = tile_probs(q, k, offs_m, offs_n, scale2, bias2, slope2, cap, diag, k_len, win_left, win_right,
                             phase != 1, CAUSAL, HAS_WINDOW, HAS_ALIBI, SOFTCAP, FAST, UPCAST, IEEE)  # fmt: skip
            keep = (
                dropout_keep(seed, pid_bh, offs_m, start_n, seqlen_q, seqlen_k, dropout_p, BLOCK_N) if DROPOUT else None
            )
            dp = tile_dot(do, tl.trans(v), UPCAST, IEEE)
            ds = _ds(p, dp, keep, 1.0 / (1.0 - dropout_p), DROPOUT)
            if NEED_DBIAS:
                dbias += tl.sum(ds, axis=1)
            dq += tile_dot(tile_cast(ds * dcap if SOFTCAP else ds, k.dtype, UPCAST), k, UPCAST, IEEE)
    dq = tile_cast(dq * (scale2 * -0.6931471805599453), DQ.dtype.element_ty, UPCAST)  # × scale
    store_tile(DQ, dq, b, q_start, offs_m, h, sdqb, sdqt, sdqh, q_len, offs_d, HEAD_DIM)
    if NEED_DBIAS:  # one partial sum per (batch·head, query block): summed by the launcher
        tl.store(DBias + pid_bh * sdb_row + pid_m, tl.sum(dbias, axis=0))


@triton.autotune(configs=autotune_configs(), key=_KEY, prune_configs_by=_pruner("bwd_dkdv"))
@triton.jit
def bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, Bias, Alibi, CuQ, CuK,
    sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sdob, sdot, sdoh, sdkb, sdkt, sdkh, sdvb, sdvt, sdvh, sab,
    seqlen_q, seqlen_k, scale2, cap, win_left, win_right, seed, dropout_p,
    HK: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_ALIBI: tl.constexpr, IS_VARLEN: tl.constexpr,
    SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr, FAST: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid_n, pid_bhk = tl.program_id(0), tl.program_id(1)
    b, hk = pid_bhk // HK, pid_bhk % HK
    q_start, q_len = seq_bounds(CuQ, b, seqlen_q, IS_VARLEN)
    k_start, k_len = seq_bounds(CuK, b, seqlen_k, IS_VARLEN)
    start_n = pid_n * BLOCK_N
    if start_n >= k_len:
        return
    diag = k_len - q_len
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k = load_tile(K, b, k_start, offs_n, hk, skb, skt, skh, k_len, offs_d, HEAD_DIM)
    v = load_tile(V, b, k_start, offs_n, hk, svb, svt, svh, k_len, offs_d, HEAD_DIM)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    lo, mid_lo, mid_hi, hi = query_range(start_n, diag, q_len, k_len, win_left, win_right, BLOCK_M, BLOCK_N,
                                          CAUSAL, HAS_WINDOW)  # fmt: skip
    inv_keep = 1.0 / (1.0 - dropout_p)
    for g in range(GROUP):  # the query heads sharing this KV head
        h = hk * GROUP + g
        pid_bh = b * HK * GROUP + h
        bias2, slope2 = head_terms(Bias, Alibi, pid_bh, b, h, sab, HAS_ALIBI)
        for phase in tl.static_range(3):
            begin, end = _span(phase, lo, mid_lo, mid_hi, hi)
            for start_m in range(begin, end, BLOCK_M):
                offs_m = start_m + tl.arange(0, BLOCK_M)
                # padded query rows load q = dO = 0, so they add nothing to dK, dV
                q = load_tile(Q, b, q_start, offs_m, h, sqb, sqt, sqh, q_len, offs_d, HEAD_DIM)
                do = load_tile(DO, b, q_start, offs_m, h, sdob, sdot, sdoh, q_len, offs_d, HEAD_DIM)
                p, dcap = tile_probs(q, k, offs_m, offs_n, scale2, bias2, slope2, cap, diag, k_len, win_left, win_right,
                                 phase != 1, CAUSAL, HAS_WINDOW, HAS_ALIBI, SOFTCAP, FAST, UPCAST, IEEE)  # fmt: skip
                keep = (
                    dropout_keep(seed, pid_bh, offs_m, start_n, seqlen_q, seqlen_k, dropout_p, BLOCK_N)
                    if DROPOUT
                    else None
                )
                p_out = tl.where(keep, p * inv_keep, 0.0) if DROPOUT else p
                dv += tile_dot(tl.trans(tile_cast(p_out, do.dtype, UPCAST)), do, UPCAST, IEEE)
                ds = _ds(p, tile_dot(do, tl.trans(v), UPCAST, IEEE), keep, inv_keep, DROPOUT)
                dk += tile_dot(tl.trans(tile_cast(ds * dcap if SOFTCAP else ds, q.dtype, UPCAST)), q, UPCAST, IEEE)
    dk = tile_cast(dk * (scale2 * -0.6931471805599453), DK.dtype.element_ty, UPCAST)  # × scale
    store_tile(DK, dk, b, k_start, offs_n, hk, sdkb, sdkt, sdkh, k_len, offs_d, HEAD_DIM)
    store_tile(DV, tile_cast(dv, DV.dtype.element_ty, UPCAST), b, k_start, offs_n, hk, sdvb, sdvt, sdvh, k_len, offs_d,
                HEAD_DIM)  # fmt: skip


# ---- launchers ---------------------------------------------------------------------------------


def _strides(t: torch.Tensor, varlen: bool) -> tuple[int, int, int]:
    """(batch, token, head) strides; packed varlen tensors have no batch stride."""
    return (0, t.stride(0), t.stride(1)) if varlen else (t.stride(0), t.stride(1), t.stride(2))


def _common(q, k, cu_q, max_q, max_k, alibi, causal, window, softcap, dropout_p):
    varlen = cu_q is not None
    batch = cu_q.numel() - 1 if varlen else q.shape[0]
    heads, head_dim = q.shape[-2], q.shape[-1]
    flags = dict(
        HEAD_DIM=head_dim,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        CAUSAL=causal,
        HAS_WINDOW=window != (-1, -1),
        HAS_ALIBI=alibi is not None,
        IS_VARLEN=varlen,
        SOFTCAP=softcap > 0,
        DROPOUT=dropout_p > 0,
        FAST=q.dtype != torch.float32,
        UPCAST=INTERPRET and q.dtype == torch.bfloat16,
        IEEE=q.dtype == torch.float32,
    )
    seqlens = (max_q, max_k) if varlen else (q.shape[1], k.shape[1])
    alibi_stride = (alibi.stride(0) if alibi.ndim == 2 else 0) if alibi is not None else 0
    return batch, heads, flags, seqlens, alibi_stride


def _dummy(t):
    return t.new_zeros(2, dtype=torch.int32)


def forward(q, k, v, bias, alibi, cu_q, cu_k, max_q, max_k, scale, causal, window, softcap, dropout_p, seed,
            return_mass, return_probs):  # fmt: skip
    """out (like q); if asked, mass fp32 ([B, H, Tq] padded / [H, total] varlen) and the kernel's
    own attention weights fp32 [B, H, Tq, Tk] (varlen: [B, H, max_q, max_k], each sequence's in
    its top-left corner), negated where dropout dropped them."""
    batch, heads, flags, (len_q, len_k), sab = _common(q, k, cu_q, max_q, max_k, alibi, causal, window, softcap,
                                                       dropout_p)  # fmt: skip
    varlen = cu_q is not None
    out = torch.zeros_like(q) if varlen else torch.empty_like(q)  # varlen: rows past the last sequence are 0
    mass_shape = (heads, q.shape[0]) if varlen else (q.shape[0], heads, q.shape[1])
    mass = torch.zeros(mass_shape if return_mass else (1, 1, 1), device=q.device, dtype=torch.float32)
    mass_strides = (0, mass.stride(0), mass.stride(1)) if varlen else mass.stride()
    probs = torch.zeros((batch, heads, len_q, len_k) if return_probs else (1, 1, 1, 1), device=q.device,
                        dtype=torch.float32)  # fmt: skip
    grid = lambda meta: (triton.cdiv(len_q, meta["BLOCK_M"]), batch * heads, 1)  # noqa: E731
    fwd_kernel[grid](
        q, k, v, out, mass, probs, bias, alibi if alibi is not None else bias, cu_q if varlen else _dummy(q),
        cu_k if varlen else _dummy(q), _dummy(q), _dummy(q), *_strides(q, varlen), *_strides(k, varlen),
        *_strides(v, varlen), *_strides(out, varlen), 0, *mass_strides, 0, sab, 0, probs.stride(1),
        probs.stride(2), len_q, len_k, 1, -scale * LOG2E.value, softcap, *window, seed, dropout_p,
        H=heads, GROUP=heads // k.shape[-2], KV_CACHE=False, PAGE_SIZE=0, RETURN_MASS=return_mass,
        RETURN_PROBS=return_probs, **flags,
    )  # fmt: skip
    return out, (mass if return_mass else None), (probs if return_probs else None)


def forward_kvcache(q, k_cache, v_cache, bias, alibi, bounds, kv_batch, block_table, scale, causal, window, softcap,
                    num_splits, return_mass, cu_q=None, max_q=0, max_k=0, return_probs=False):  # fmt: skip
    """Attention of q over cached keys: sequence b reads tokens bounds[b, 0] .. bounds[b, 0] +
    bounds[b, 1] of cache row kv_batch[b] (or of the pages of block_table[b]). q is padded
    [B, Tq, H, D], or packed [total, H, D] with cu_q (paged varlen; the weights, if asked,
    [B, H, max_q, max_k] as `forward`'s). With num_splits > 1 the key range is cut in slices
    computed in parallel and summed: sigmoid attention over a union of key sets is the sum of
    its parts."""
    batch, heads, flags, (len_q, _), sab = _common(q, q, cu_q, max_q, 0, alibi, causal, window, softcap, 0.0)
    varlen, paged = cu_q is not None, block_table is not None
    capacity = block_table.shape[1] * k_cache.shape[1] if paged else k_cache.shape[1]
    split_shape = (num_splits, *q.shape) if num_splits > 1 else q.shape
    alloc = torch.zeros if varlen else torch.empty  # varlen: rows past the last sequence are 0
    out = alloc(split_shape, device=q.device, dtype=torch.float32 if num_splits > 1 else q.dtype)
    mass_shape = (heads, q.shape[0]) if varlen else (batch, heads, len_q)
    mass = torch.zeros((num_splits, *mass_shape) if return_mass else (1, 1, 1, 1), device=q.device,
                       dtype=torch.float32)  # fmt: skip
    mass_strides = (0, *mass.stride()[1:3]) if varlen else mass.stride()[1:]
    probs = torch.zeros((batch, heads, len_q, max_k) if return_probs else (1, 1, 1, 1), device=q.device,
                        dtype=torch.float32)  # fmt: skip
    cache_strides = [(t.stride(0), t.stride(1), t.stride(2)) for t in (k_cache, v_cache)]
    out_strides = _strides(out[0] if num_splits > 1 else out, varlen)
    grid = lambda meta: (triton.cdiv(len_q, meta["BLOCK_M"]), batch * heads, num_splits)  # noqa: E731
    fwd_kernel[grid](
        q, k_cache, v_cache, out, mass, probs, bias, alibi if alibi is not None else bias,
        cu_q if varlen else _dummy(q), bounds, block_table if paged else _dummy(q), kv_batch, *_strides(q, varlen),
        *cache_strides[0], *cache_strides[1], *out_strides, out.stride(0) if num_splits > 1 else 0, *mass_strides,
        mass.stride(0), sab, block_table.stride(0) if paged else 0, probs.stride(1), probs.stride(2), len_q, capacity,
        num_splits,
        -scale * LOG2E.value, softcap, *window, 0, 0.0,
        H=heads, GROUP=heads // k_cache.shape[-2], KV_CACHE=True, PAGE_SIZE=k_cache.shape[1] if paged else 0,
        RETURN_MASS=return_mass, RETURN_PROBS=return_probs, **flags,
    )  # fmt: skip
    if num_splits > 1:
        out = out.sum(0).to(q.dtype)
    return out, (mass.sum(0) if return_mass else None), (probs if return_probs else None)


def backward(do, q, k, v, bias, alibi, cu_q, cu_k, max_q, max_k, scale, causal, window, softcap, dropout_p, seed,
             need_dbias):  # fmt: skip
    """dq, dk, dv (like q, k, v) and dbias [B, H] fp32 (zeros unless need_dbias)."""
    batch, heads, flags, (len_q, len_k), sab = _common(q, k, cu_q, max_q, max_k, alibi, causal, window, softcap,
                                                       dropout_p)  # fmt: skip
    varlen, kv_heads = cu_q is not None, k.shape[-2]
    do = do.contiguous() if do.stride(-1) != 1 else do
    alloc = torch.zeros_like if varlen else torch.empty_like  # varlen: rows past the last sequence get 0
    dq, dk, dv = alloc(q), alloc(k), alloc(v)
    min_block = min(c.kwargs["BLOCK_M"] for c in autotune_configs())
    partial = torch.zeros(batch * heads, triton.cdiv(len_q, min_block), device=q.device, dtype=torch.float32)
    alibi_arg = alibi if alibi is not None else bias
    cu = (cu_q, cu_k) if varlen else (_dummy(q), _dummy(q))
    common = (len_q, len_k, -scale * LOG2E.value, softcap, *window, seed, dropout_p)
    bwd_dq_kernel[lambda meta: (triton.cdiv(len_q, meta["BLOCK_M"]), batch * heads)](
        q, k, v, do, dq, partial, bias, alibi_arg, *cu,
        *_strides(q, varlen), *_strides(k, varlen), *_strides(v, varlen), *_strides(do, varlen),
        *_strides(dq, varlen), sab, partial.stride(0), *common,
        H=heads, GROUP=heads // kv_heads, NEED_DBIAS=need_dbias, **flags,
    )  # fmt: skip
    bwd_dkdv_kernel[lambda meta: (triton.cdiv(len_k, meta["BLOCK_N"]), batch * kv_heads)](
        q, k, v, do, dk, dv, bias, alibi_arg, *cu,
        *_strides(q, varlen), *_strides(k, varlen), *_strides(v, varlen), *_strides(do, varlen),
        *_strides(dk, varlen), *_strides(dv, varlen), sab, *common,
        HK=kv_heads, GROUP=heads // kv_heads, **flags,
    )  # fmt: skip
    return dq, dk, dv, partial.view(batch, heads, -1).sum(dim=2)
