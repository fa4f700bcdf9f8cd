"""Triton device functions shared by the FlashSigmoid kernels: tile loads, key/query ranges and
the element-wise attention pipeline.

Logits are carried in base-2 and negated, t = −s·log₂e, so that p = σ(s) = 1 / (1 + 2ᵗ): the
softmax scale, the bias and log₂e fold into one FMA (t = q·k · scale₂ + bias₂), and the only
special-function (MUFU) instruction per element is the ex2. The reciprocal runs on the FMA
pipe: a bit-trick seed (max relative error 5.1 %) and two Newton steps (6.6e-6, systematic and
below fp16's rounding); `tl.sigmoid` would add a MUFU.RCP per element, and `tanh.approx` has an
absolute error near 2⁻¹¹, larger than p itself when b = −log n and n > 2k. The fp32 kernels keep
an exact division (FAST off). The interpreter runs the same arithmetic, so CPU tests check the
numbers the GPU computes.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def tile_dot(a, b, UPCAST: tl.constexpr, IEEE: tl.constexpr):
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
def tile_cast(x, dtype: tl.constexpr, UPCAST: tl.constexpr):
    """x.to(dtype), rounding to nearest even. The interpreter truncates fp32 -> bf16 (twice
    the hardware's error), so under UPCAST the rounding is done on the bits first."""
    if UPCAST:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def sigmoid2(t, FAST: tl.constexpr):
    """1 / (1 + 2ᵗ) = σ(−t·ln 2): one MUFU.EX2; the reciprocal by Newton's method when FAST."""
    if FAST:
        y = 1.0 + tl.exp2(tl.minimum(t, 125.0))  # y ≤ 2¹²⁵: the seed stays a normal float
        r = (0x7EF311C3 - y.to(tl.int32, bitcast=True)).to(tl.float32, bitcast=True)
        r = r * (2.0 - y * r)
        return r * (2.0 - y * r)
    else:
        return 1.0 / (1.0 + tl.exp2(t))


@triton.jit
def seq_bounds(Cu, b, fixed_len, IS_VARLEN: tl.constexpr):
    if IS_VARLEN:
        start = tl.load(Cu + b)
        return start, tl.load(Cu + b + 1) - start
    else:
        return 0, fixed_len


@triton.jit
def row_offsets(b, start, offs, sb, st):
    """Element offsets of rows `offs` of sequence b starting at token `start`, in int64: batch ×
    stride and token × stride pass 2³¹ in long contexts."""
    return b.to(tl.int64) * sb + (offs.to(tl.int64) + start) * st


@triton.jit
def tile_offsets(b, start, offs, head, sb, st, sh, offs_d):
    """Element offsets (rows, BLOCK_D) of rows `offs` of one head of sequence b."""
    return (row_offsets(b, start, offs, sb, st) + head.to(tl.int64) * sh)[:, None] + offs_d[None, :]


@triton.jit
def load_rows(Ptr, rows, head, sh, valid, offs_d, HEAD_DIM: tl.constexpr):
    """Tile (rows, BLOCK_D) of one head at precomputed row offsets; invalid rows read 0."""
    mask = valid[:, None] & (offs_d[None, :] < HEAD_DIM)
    return tl.load(Ptr + (rows + head.to(tl.int64) * sh)[:, None] + offs_d[None, :], mask=mask, other=0.0)


@triton.jit
def load_tile(Ptr, b, start, offs, head, sb, st, sh, length, offs_d, HEAD_DIM: tl.constexpr):
    """Rows `offs` (< length) of one head of sequence b, starting at token `start`: (rows, BLOCK_D)."""
    return load_rows(Ptr, row_offsets(b, start, offs, sb, st), head, sh, offs < length, offs_d, HEAD_DIM)


@triton.jit
def store_tile(Ptr, value, b, start, offs, head, sb, st, sh, length, offs_d, HEAD_DIM: tl.constexpr):
    mask = (offs[:, None] < length) & (offs_d[None, :] < HEAD_DIM)
    tl.store(Ptr + tile_offsets(b, start, offs, head, sb, st, sh, offs_d), value, mask=mask)


@triton.jit
def tile_probs(q, k, offs_m, offs_n, scale2, bias2, slope2, cap, diag, k_len, win_left, win_right,
           MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_ALIBI: tl.constexpr,
           SOFTCAP: tl.constexpr, FAST: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):  # fmt: skip
    """p = σ(s) with s = c(scale·q·kᵀ) + bias − slope·|i + diag − j|, where c is the softcap
    x ↦ cap·tanh(x/cap) (identity without), 0 outside the mask; and c's derivative
    1 − tanh²(x/cap) (1.0 without): (M, N). scale2 = −scale·log₂e, bias2 = −bias·log₂e,
    slope2 = slope·log₂e (see the module's note). MASKED off: every (i, j) is allowed."""
    t = tile_dot(q, tl.trans(k), UPCAST, IEEE) * scale2  # −x·log₂e; with the bias below, one FMA
    dcap = 1.0
    if SOFTCAP:  # tanh(x/cap) = 1 − 2σ(−2x/cap): a second ex2, no tanh unit
        th = 1.0 - 2.0 * sigmoid2(t * (-2.0 / cap), FAST)
        t = th * (-cap * LOG2E)
        dcap = 1.0 - th * th
    t += bias2
    rel = offs_n[None, :] - offs_m[:, None] - diag  # j − (i + Tk − Tq)
    if HAS_ALIBI:
        t += slope2 * tl.abs(rel).to(tl.float32)
    p = sigmoid2(t, FAST)
    if MASKED:
        allowed = (offs_n < k_len)[None, :]
        if CAUSAL:
            allowed = allowed & (rel <= 0)
        if HAS_WINDOW:
            allowed = allowed & ((win_left < 0) | (rel >= -win_left)) & ((win_right < 0) | (rel <= win_right))
        p = tl.where(allowed, p, 0.0)
    return p, dcap


@triton.jit
def head_terms(Bias, Alibi, pid_bh, b, h, sab, HAS_ALIBI: tl.constexpr):
    """(bias2, slope2) of head h of sequence b, in the base-2 units `tile_probs` takes."""
    bias2 = tl.load(Bias + pid_bh) * -LOG2E
    slope2 = tl.load(Alibi + b * sab + h) * LOG2E if HAS_ALIBI else 0.0
    return bias2, slope2


@triton.jit
def dropout_keep(seed, pid_bh, offs_m, start_n, len_q_max, len_k_max, dropout_p, BLOCK_N: tl.constexpr):
    """The dropout pattern of the tile (offs_m, start_n … start_n + BLOCK_N): element (b·h, i, j)
    is kept when its counter-based random number is at least dropout_p, the same in every
    kernel. One Philox call (seed; counter = the index of (b·h, i, j // 4)) gives the four
    numbers of columns 4·(j // 4) … + 3: a quarter of the integer work of one call per element."""
    rows = pid_bh.to(tl.int64) * len_q_max + offs_m.to(tl.int64)
    quads = start_n // 4 + tl.arange(0, BLOCK_N // 4)
    r0, r1, r2, r3 = tl.randint4x(seed, rows[:, None] * ((len_k_max + 3) // 4) + quads[None, :])
    r = tl.join(tl.join(r0, r2), tl.join(r1, r3))  # (M, N/4, 2, 2): column 4q + k takes r_k
    return tl.random.uint_to_uniform_float(tl.reshape(r, (offs_m.shape[0], BLOCK_N))) >= dropout_p


@triton.jit
def key_range(start_m, diag, k_len, win_left, win_right, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):  # fmt: skip
    """Key blocks for query rows [start_m, start_m + BLOCK_M), as three block-aligned bounds:
    [lo, mid_lo) and [mid_hi, hi) need the mask (window edge, diagonal, ragged end); every
    (i, j) in [mid_lo, mid_hi) is allowed."""
    lo = 0
    hi = k_len
    full_lo = 0  # first key every row may see
    full_hi = k_len  # one past the last key every row may see
    if CAUSAL:
        hi = tl.minimum(hi, start_m + BLOCK_M + diag)
        full_hi = tl.minimum(full_hi, start_m + diag + 1)
    if HAS_WINDOW:
        if win_right >= 0:
            hi = tl.minimum(hi, start_m + BLOCK_M + diag + win_right)
            full_hi = tl.minimum(full_hi, start_m + diag + win_right + 1)
        if win_left >= 0:
            lo = tl.maximum(0, start_m + diag - win_left) // BLOCK_N * BLOCK_N
            full_lo = start_m + BLOCK_M - 1 + diag - win_left
    hi = tl.maximum(hi, lo)
    mid_lo = tl.minimum(tl.maximum(tl.cdiv(tl.maximum(full_lo, 0), BLOCK_N) * BLOCK_N, lo), hi)
    mid_hi = tl.maximum(tl.minimum(tl.maximum(full_hi, 0) // BLOCK_N * BLOCK_N, hi), mid_lo)
    return lo, mid_lo, mid_hi, hi


@triton.jit
def query_range(start_n, diag, q_len, k_len, win_left, win_right, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):  # fmt: skip
    """Query blocks that see keys [start_n, start_n + BLOCK_N), as `key_range`'s three bounds:
    every (i, j) of a query block in [mid_lo, mid_hi) is allowed."""
    lo = 0
    hi = q_len
    full_lo = 0  # first row that sees the whole key block
    full_hi = hi  # one past the last such row (padded rows carry no gradient: dO is 0 there)
    if CAUSAL:
        lo = tl.maximum(0, start_n - diag)
        full_lo = start_n + BLOCK_N - 1 - diag
    if HAS_WINDOW:
        if win_right >= 0:
            lo = tl.maximum(lo, start_n - diag - win_right)
            full_lo = tl.maximum(full_lo, start_n + BLOCK_N - 1 - diag - win_right)
        if win_left >= 0:
            hi = tl.minimum(hi, start_n + BLOCK_N - diag + win_left)
            full_hi = start_n - diag + win_left + 1
    lo = lo // BLOCK_M * BLOCK_M
    hi = tl.maximum(hi, lo)
    if start_n + BLOCK_N > k_len:  # the ragged last key block is masked for every query block
        full_hi = 0
    mid_lo = tl.minimum(tl.maximum(tl.cdiv(tl.maximum(full_lo, 0), BLOCK_M) * BLOCK_M, lo), hi)
    mid_hi = tl.maximum(tl.minimum(tl.maximum(full_hi, 0) // BLOCK_M * BLOCK_M, hi), mid_lo)
    return lo, mid_lo, mid_hi, hi
