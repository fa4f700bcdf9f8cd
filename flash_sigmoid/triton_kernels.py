"""FlashSigmoid Triton kernels (forward, backward) and their launchers.

Sigmoid attention needs no running max, no row sum and no log-sum-exp: each key block's
contribution σ(s)·v is final when computed. The forward is one pass over the visible key
blocks; the backward recomputes p and uses dS = p(1 − p)·dP — no preprocessing kernel.
Backward runs as two deterministic kernels (no atomics): one per key block for dK, dV (summing
the query heads of a GQA group), one per query block for dQ and the bias gradient. The bias is
a contiguous fp32 [batch, heads] table (per head, or per sequence and head).

Layouts: padded [B, T, H, D] or packed varlen [total, H, D] with cu_seqlens; the kernels see
both through (batch stride, token stride, head stride) and per-sequence start offsets.
Import this module only after TRITON_INTERPRET is decided: Triton fixes the mode at decoration.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _configs():
    if INTERPRET:  # the interpreter runs on numpy: one small tile keeps it fast
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=1, num_stages=1)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm, bn, w, s in [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 4), (128, 32, 4, 4), (64, 32, 4, 2)]
    ]


def _prune(configs, named_args, **kwargs):
    """Large head dims need smaller tiles to fit shared memory."""
    if named_args.get("BLOCK_D", kwargs.get("BLOCK_D", 64)) <= 128:
        return configs
    small = [c for c in configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 64]
    return small or configs


_KEY = ["BLOCK_D", "CAUSAL", "HAS_WINDOW", "HAS_ALIBI", "IS_VARLEN"]  # tensor dtypes are keyed too


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """a @ b with fp32 accumulation. IEEE: no TF32 for fp32 inputs. UPCAST (bf16 under the
    interpreter, whose bf16 dot is wrong): the operands as fp32, i.e. exact products with fp32
    accumulation, which is what the hardware does."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _cast(x, dtype: tl.constexpr, UPCAST: tl.constexpr):
    """x.to(dtype), rounding to nearest even. The interpreter truncates fp32 -> bf16 (twice
    the hardware's error), so under UPCAST the rounding is done on the bits first."""
    if UPCAST:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _seq_bounds(Cu, b, fixed_len, IS_VARLEN: tl.constexpr):
    if IS_VARLEN:
        start = tl.load(Cu + b)
        return start, tl.load(Cu + b + 1) - start
    else:
        return 0, fixed_len


@triton.jit
def _tile_offsets(b, start, offs, head, sb, st, sh, offs_d):
    """Element offsets (rows, BLOCK_D) of rows `offs` of one head of sequence b, starting at token
    `start`. In int64: batch × stride and token × stride pass 2³¹ in long contexts."""
    rows = offs[:, None].to(tl.int64) + start
    return b.to(tl.int64) * sb + rows * st + head.to(tl.int64) * sh + offs_d[None, :]


@triton.jit
def _load_tile(Ptr, b, start, offs, head, sb, st, sh, length, offs_d, HEAD_DIM: tl.constexpr):
    """Rows `offs` (< length) of one head of sequence b, starting at token `start`: (rows, BLOCK_D)."""
    mask = (offs[:, None] < length) & (offs_d[None, :] < HEAD_DIM)
    return tl.load(Ptr + _tile_offsets(b, start, offs, head, sb, st, sh, offs_d), mask=mask, other=0.0)


@triton.jit
def _store_tile(Ptr, value, b, start, offs, head, sb, st, sh, length, offs_d, HEAD_DIM: tl.constexpr):
    mask = (offs[:, None] < length) & (offs_d[None, :] < HEAD_DIM)
    tl.store(Ptr + _tile_offsets(b, start, offs, head, sb, st, sh, offs_d), value, mask=mask)


@triton.jit
def _probs(q, k, offs_m, offs_n, scale, bias, slope, diag, k_len, win_left, win_right,
           CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_ALIBI: tl.constexpr,
           UPCAST: tl.constexpr, IEEE: tl.constexpr):  # fmt: skip
    """p = σ(scale·q·kᵀ + bias − slope·|i + diag − j|) on allowed (i, j), 0 elsewhere: (M, N)."""
    s = _dot(q, tl.trans(k), UPCAST, IEEE) * scale + bias
    rel = offs_n[None, :] - offs_m[:, None] - diag  # j − (i + Tk − Tq)
    if HAS_ALIBI:
        s = s - slope * tl.abs(rel).to(tl.float32)
    allowed = (offs_n < k_len)[None, :]
    if CAUSAL:
        allowed = allowed & (rel <= 0)
    if HAS_WINDOW:
        allowed = allowed & ((win_left < 0) | (rel >= -win_left)) & ((win_right < 0) | (rel <= win_right))
    return tl.where(allowed, tl.sigmoid(s), 0.0)


@triton.jit
def _key_range(start_m, diag, k_len, win_left, win_right, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):  # fmt: skip
    """[lo, hi) of key columns that rows [start_m, start_m + BLOCK_M) can see; lo block-aligned."""
    lo = 0
    hi = k_len
    if CAUSAL:
        hi = tl.minimum(hi, start_m + BLOCK_M + diag)
    if HAS_WINDOW:
        if win_right >= 0:
            hi = tl.minimum(hi, start_m + BLOCK_M + diag + win_right)
        if win_left >= 0:
            lo = tl.maximum(0, start_m + diag - win_left) // BLOCK_N * BLOCK_N
    return lo, hi


@triton.jit
def _query_range(start_n, diag, q_len, win_left, win_right, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):  # fmt: skip
    """[lo, hi) of query rows that can see keys [start_n, start_n + BLOCK_N); lo block-aligned."""
    lo = 0
    hi = q_len
    if CAUSAL:
        lo = tl.maximum(0, start_n - diag)
    if HAS_WINDOW:
        if win_right >= 0:
            lo = tl.maximum(lo, start_n - diag - win_right)
        if win_left >= 0:
            hi = tl.minimum(hi, start_n + BLOCK_N - diag + win_left)
    return lo // BLOCK_M * BLOCK_M, hi


@triton.autotune(configs=_configs(), key=_KEY, prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _fwd_kernel(
    Q, K, V, Out, Mass, Bias, Alibi, CuQ, CuK,
    sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sob, sot, soh, smb, smh, smt, sab,
    seqlen_q, seqlen_k, scale, win_left, win_right,
    H: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_ALIBI: tl.constexpr, IS_VARLEN: tl.constexpr,
    RETURN_MASS: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // H, pid_bh % H
    hk = h // GROUP
    q_start, q_len = _seq_bounds(CuQ, b, seqlen_q, IS_VARLEN)
    k_start, k_len = _seq_bounds(CuK, b, seqlen_k, IS_VARLEN)
    start_m = pid_m * BLOCK_M
    if start_m >= q_len:
        return
    diag = k_len - q_len
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_tile(Q, b, q_start, offs_m, h, sqb, sqt, sqh, q_len, offs_d, HEAD_DIM)
    bias = tl.load(Bias + pid_bh)
    slope = tl.load(Alibi + b * sab + h) if HAS_ALIBI else 0.0
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    mass = tl.zeros([BLOCK_M], dtype=tl.float32)
    lo, hi = _key_range(start_m, diag, k_len, win_left, win_right, BLOCK_M, BLOCK_N, CAUSAL, HAS_WINDOW)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_tile(K, b, k_start, offs_n, hk, skb, skt, skh, k_len, offs_d, HEAD_DIM)
        v = _load_tile(V, b, k_start, offs_n, hk, svb, svt, svh, k_len, offs_d, HEAD_DIM)
        p = _probs(q, k, offs_m, offs_n, scale, bias, slope, diag, k_len, win_left, win_right,
                   CAUSAL, HAS_WINDOW, HAS_ALIBI, UPCAST, IEEE)  # fmt: skip
        if RETURN_MASS:
            mass += tl.sum(p, axis=1)
        acc += _dot(_cast(p, v.dtype, UPCAST), v, UPCAST, IEEE)
    out = _cast(acc, Out.dtype.element_ty, UPCAST)
    _store_tile(Out, out, b, q_start, offs_m, h, sob, sot, soh, q_len, offs_d, HEAD_DIM)
    if RETURN_MASS:
        rows = offs_m.to(tl.int64) + q_start
        tl.store(Mass + b.to(tl.int64) * smb + h.to(tl.int64) * smh + rows * smt, mass, mask=offs_m < q_len)


@triton.autotune(configs=_configs(), key=_KEY, prune_configs_by={"early_config_prune": _prune}, reset_to_zero=["DBias"])
@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, DQ, DBias, Bias, Alibi, CuQ, CuK,
    sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sdob, sdot, sdoh, sdqb, sdqt, sdqh, sab, sdb_row,
    seqlen_q, seqlen_k, scale, win_left, win_right,
    H: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_ALIBI: tl.constexpr, IS_VARLEN: tl.constexpr,
    NEED_DBIAS: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // H, pid_bh % H
    hk = h // GROUP
    q_start, q_len = _seq_bounds(CuQ, b, seqlen_q, IS_VARLEN)
    k_start, k_len = _seq_bounds(CuK, b, seqlen_k, IS_VARLEN)
    start_m = pid_m * BLOCK_M
    if start_m >= q_len:
        return
    diag = k_len - q_len
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_tile(Q, b, q_start, offs_m, h, sqb, sqt, sqh, q_len, offs_d, HEAD_DIM)
    do = _load_tile(DO, b, q_start, offs_m, h, sdob, sdot, sdoh, q_len, offs_d, HEAD_DIM)
    bias = tl.load(Bias + pid_bh)
    slope = tl.load(Alibi + b * sab + h) if HAS_ALIBI else 0.0
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dbias = tl.zeros([BLOCK_M], dtype=tl.float32)
    lo, hi = _key_range(start_m, diag, k_len, win_left, win_right, BLOCK_M, BLOCK_N, CAUSAL, HAS_WINDOW)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_tile(K, b, k_start, offs_n, hk, skb, skt, skh, k_len, offs_d, HEAD_DIM)
        v = _load_tile(V, b, k_start, offs_n, hk, svb, svt, svh, k_len, offs_d, HEAD_DIM)
        p = _probs(q, k, offs_m, offs_n, scale, bias, slope, diag, k_len, win_left, win_right,
                   CAUSAL, HAS_WINDOW, HAS_ALIBI, UPCAST, IEEE)  # fmt: skip
        dp = _dot(do, tl.trans(v), UPCAST, IEEE)
        ds = p * (1.0 - p) * dp
        dq += _dot(_cast(ds, k.dtype, UPCAST), k, UPCAST, IEEE)
        if NEED_DBIAS:
            dbias += tl.sum(ds, axis=1)
    dq = _cast(dq * scale, DQ.dtype.element_ty, UPCAST)
    _store_tile(DQ, dq, b, q_start, offs_m, h, sdqb, sdqt, sdqh, q_len, offs_d, HEAD_DIM)
    if NEED_DBIAS:  # one partial sum per (batch·head, query block): summed by the launcher
        tl.store(DBias + pid_bh * sdb_row + pid_m, tl.sum(dbias, axis=0))


@triton.autotune(configs=_configs(), key=_KEY, prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, Bias, Alibi, CuQ, CuK,
    sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sdob, sdot, sdoh, sdkb, sdkt, sdkh, sdvb, sdvt, sdvh, sab,
    seqlen_q, seqlen_k, scale, win_left, win_right,
    HK: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_ALIBI: tl.constexpr, IS_VARLEN: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid_n, pid_bh = tl.program_id(0), tl.program_id(1)
    b, hk = pid_bh // HK, pid_bh % HK
    q_start, q_len = _seq_bounds(CuQ, b, seqlen_q, IS_VARLEN)
    k_start, k_len = _seq_bounds(CuK, b, seqlen_k, IS_VARLEN)
    start_n = pid_n * BLOCK_N
    if start_n >= k_len:
        return
    diag = k_len - q_len
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_tile(K, b, k_start, offs_n, hk, skb, skt, skh, k_len, offs_d, HEAD_DIM)
    v = _load_tile(V, b, k_start, offs_n, hk, svb, svt, svh, k_len, offs_d, HEAD_DIM)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    lo, hi = _query_range(start_n, diag, q_len, win_left, win_right, BLOCK_M, BLOCK_N, CAUSAL, HAS_WINDOW)
    for g in range(GROUP):  # the query heads sharing this KV head
        h = hk * GROUP + g
        bias = tl.load(Bias + b * HK * GROUP + h)
        slope = tl.load(Alibi + b * sab + h) if HAS_ALIBI else 0.0
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            q = _load_tile(Q, b, q_start, offs_m, h, sqb, sqt, sqh, q_len, offs_d, HEAD_DIM)
            do = _load_tile(DO, b, q_start, offs_m, h, sdob, sdot, sdoh, q_len, offs_d, HEAD_DIM)
            p = _probs(q, k, offs_m, offs_n, scale, bias, slope, diag, k_len, win_left, win_right,
                       CAUSAL, HAS_WINDOW, HAS_ALIBI, UPCAST, IEEE)  # fmt: skip
            p = tl.where(offs_m[:, None] < q_len, p, 0.0)  # padded query rows carry no gradient
            dp = _dot(do, tl.trans(v), UPCAST, IEEE)
            ds = p * (1.0 - p) * dp
            dv += _dot(tl.trans(_cast(p, do.dtype, UPCAST)), do, UPCAST, IEEE)
            dk += _dot(tl.trans(_cast(ds, q.dtype, UPCAST)), q, UPCAST, IEEE)
    dk = _cast(dk * scale, DK.dtype.element_ty, UPCAST)
    _store_tile(DK, dk, b, k_start, offs_n, hk, sdkb, sdkt, sdkh, k_len, offs_d, HEAD_DIM)
    _store_tile(DV, _cast(dv, DV.dtype.element_ty, UPCAST), b, k_start, offs_n, hk, sdvb, sdvt, sdvh, k_len, offs_d,
                HEAD_DIM)  # fmt: skip


# ---- launchers ---------------------------------------------------------------------------------


def _strides(t: torch.Tensor, varlen: bool) -> tuple[int, int, int]:
    """(batch, token, head) strides; packed varlen tensors have no batch stride."""
    return (0, t.stride(0), t.stride(1)) if varlen else (t.stride(0), t.stride(1), t.stride(2))


def _common(q, k, cu_q, max_q, max_k, alibi, causal, window):
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
        UPCAST=INTERPRET and q.dtype == torch.bfloat16,
        IEEE=q.dtype == torch.float32,
    )
    seqlens = (max_q, max_k) if varlen else (q.shape[1], k.shape[1])
    alibi_stride = (alibi.stride(0) if alibi.ndim == 2 else 0) if alibi is not None else 0
    return batch, heads, flags, seqlens, alibi_stride


def _dummy(t):
    return t.new_zeros(1, dtype=torch.int32)


def forward(q, k, v, bias, alibi, cu_q, cu_k, max_q, max_k, scale, causal, window, return_mass):
    """out (like q) and, if asked, mass fp32 ([B, H, Tq] padded / [H, total] varlen)."""
    batch, heads, flags, (len_q, len_k), sab = _common(q, k, cu_q, max_q, max_k, alibi, causal, window)
    varlen = cu_q is not None
    out = torch.zeros_like(q) if varlen else torch.empty_like(q)  # varlen: rows past the last sequence are 0
    mass_shape = (heads, q.shape[0]) if varlen else (q.shape[0], heads, q.shape[1])
    mass = torch.zeros(mass_shape if return_mass else (1, 1, 1), device=q.device, dtype=torch.float32)
    mass_strides = (0, mass.stride(0), mass.stride(1)) if varlen else mass.stride()
    grid = lambda meta: (triton.cdiv(len_q, meta["BLOCK_M"]), batch * heads)  # noqa: E731
    _fwd_kernel[grid](
        q, k, v, out, mass, bias, alibi if alibi is not None else bias, cu_q if varlen else _dummy(q),
        cu_k if varlen else _dummy(q), *_strides(q, varlen), *_strides(k, varlen), *_strides(v, varlen),
        *_strides(out, varlen), *mass_strides, sab, len_q, len_k, scale, *window,
        H=heads, GROUP=heads // k.shape[-2], RETURN_MASS=return_mass, **flags,
    )  # fmt: skip
    return out, (mass if return_mass else None)


def backward(do, q, k, v, bias, alibi, cu_q, cu_k, max_q, max_k, scale, causal, window, need_dbias):
    """dq, dk, dv (like q, k, v) and dbias [B, H] fp32 (zeros unless need_dbias)."""
    batch, heads, flags, (len_q, len_k), sab = _common(q, k, cu_q, max_q, max_k, alibi, causal, window)
    varlen, kv_heads = cu_q is not None, k.shape[-2]
    do = do.contiguous() if do.stride(-1) != 1 else do
    alloc = torch.zeros_like if varlen else torch.empty_like  # varlen: rows past the last sequence get 0
    dq, dk, dv = alloc(q), alloc(k), alloc(v)
    min_block = min(c.kwargs["BLOCK_M"] for c in _configs())
    partial = torch.zeros(batch * heads, triton.cdiv(len_q, min_block), device=q.device, dtype=torch.float32)
    alibi_arg = alibi if alibi is not None else bias
    cu = (cu_q, cu_k) if varlen else (_dummy(q), _dummy(q))
    _bwd_dq_kernel[lambda meta: (triton.cdiv(len_q, meta["BLOCK_M"]), batch * heads)](
        q, k, v, do, dq, partial, bias, alibi_arg, *cu,
        *_strides(q, varlen), *_strides(k, varlen), *_strides(v, varlen), *_strides(do, varlen),
        *_strides(dq, varlen), sab, partial.stride(0), len_q, len_k, scale, *window,
        H=heads, GROUP=heads // kv_heads, NEED_DBIAS=need_dbias, **flags,
    )  # fmt: skip
    _bwd_dkdv_kernel[lambda meta: (triton.cdiv(len_k, meta["BLOCK_N"]), batch * kv_heads)](
        q, k, v, do, dk, dv, bias, alibi_arg, *cu,
        *_strides(q, varlen), *_strides(k, varlen), *_strides(v, varlen), *_strides(do, varlen),
        *_strides(dk, varlen), *_strides(dv, varlen), sab, len_q, len_k, scale, *window,
        HK=kv_heads, GROUP=heads // kv_heads, **flags,
    )  # fmt: skip
    return dq, dk, dv, partial.view(batch, heads, -1).sum(dim=2)
