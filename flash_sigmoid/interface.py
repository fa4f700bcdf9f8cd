"""Argument checks, custom ops, autograd and the FlashAttention-2-compatible functions.

Dispatch: CUDA tensors run the Triton kernels; CPU tensors run the chunked PyTorch path of
`reference.py`, unless TRITON_INTERPRET=1, which runs the Triton kernels themselves on CPU
(how the kernels are tested without a GPU). The forward and backward are `torch.library`
custom ops with fake implementations, so `torch.compile(fullgraph=True)` traces through.
"""

from __future__ import annotations

import math
import os

import torch

from . import reference

MAX_HEAD_DIM = 256
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def use_triton(t: torch.Tensor) -> bool:
    return t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def kernels():
    from . import triton_kernels  # imported on first use: Triton fixes interpreter mode at import

    return triton_kernels


# ---- CPU path over packed sequences --------------------------------------------------------------


def _per_sequence(fn, q_like, k_like, bias, alibi, cu_q, cu_k, probs=None, **kw):
    """`fn` on each sequence of packed varlen tensors as a batch of one, with its bias row (and
    its ALiBi slopes when they are per sequence, its corner of `probs` when given). Yields
    (query rows, key rows, result)."""
    bounds_q, bounds_k = cu_q.tolist(), cu_k.tolist()  # CPU tensors: no device to wait for
    for b in range(len(bounds_q) - 1):
        sq, sk = slice(bounds_q[b], bounds_q[b + 1]), slice(bounds_k[b], bounds_k[b + 1])
        slopes = alibi[b : b + 1] if alibi is not None and alibi.ndim == 2 else alibi
        tensors = [t[sq][None] for t in q_like] + [t[sk][None] for t in k_like]
        if probs is not None:
            kw["probs"] = probs[b : b + 1, :, : sq.stop - sq.start, : sk.stop - sk.start]
        yield sq, sk, fn(*tensors, bias=bias[b : b + 1], alibi_slopes=slopes, **kw)


@torch.autocast("cpu", enabled=False)  # the path computes in fp32 itself; autocast would make it bf16
def _cpu_forward(q, k, v, bias, alibi, cu_q, cu_k, max_q, max_k, scale, causal, window, softcap, dropout_p, seed,
                 return_probs):  # fmt: skip
    kw = dict(scale=scale, causal=causal, window=window, softcap=softcap, dropout_p=dropout_p, seed=seed)
    batch, heads = (q.shape[0], q.shape[2]) if cu_q is None else (cu_q.numel() - 1, q.shape[1])
    lengths = (q.shape[1], k.shape[1]) if cu_q is None else (max_q, max_k)
    probs = q.new_zeros(batch, heads, *lengths, dtype=torch.float32) if return_probs else None
    if cu_q is None:
        return *reference.chunked_forward(q, k, v, bias=bias, alibi_slopes=alibi, probs=probs, **kw), probs
    # rows beyond the last sequence (cu_seqlens[-1] < total) are not attention rows: zeros
    out, mass = torch.zeros_like(q), q.new_zeros(q.shape[1], q.shape[0], dtype=torch.float32)
    for sq, _, (o, m) in _per_sequence(reference.chunked_forward, (q,), (k, v), bias, alibi, cu_q, cu_k, probs,
                                       **kw):  # fmt: skip
        out[sq], mass[:, sq] = o[0], m[0]
    return out, mass, probs


@torch.autocast("cpu", enabled=False)
def _cpu_backward(do, q, k, v, bias, alibi, cu_q, cu_k, scale, causal, window, softcap, dropout_p, seed):
    kw = dict(scale=scale, causal=causal, window=window, softcap=softcap, dropout_p=dropout_p, seed=seed)
    if cu_q is None:
        return reference.chunked_backward(do, q, k, v, bias=bias, alibi_slopes=alibi, **kw)
    dq, dk, dv, dbias = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), torch.zeros_like(bias)
    for b, (sq, sk, grads) in enumerate(
        _per_sequence(reference.chunked_backward, (do, q), (k, v), bias, alibi, cu_q, cu_k, **kw)
    ):
        dq[sq], dk[sk], dv[sk], dbias[b] = grads[0][0], grads[1][0], grads[2][0], grads[3][0]
    return dq, dk, dv, dbias


# ---- custom ops ------------------------------------------------------------------------------


@torch.library.custom_op("flash_sigmoid::fwd", mutates_args=())
def _fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, alibi: torch.Tensor | None,
    cu_q: torch.Tensor | None, cu_k: torch.Tensor | None, max_q: int, max_k: int, scale: float, causal: bool,
    window_left: int, window_right: int, softcap: float, dropout_p: float, seed: int, return_mass: bool,
    return_probs: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    options = (scale, causal, (window_left, window_right), softcap, dropout_p, seed)
    if use_triton(q):
        out, mass, probs = kernels().forward(q, k, v, bias, alibi, cu_q, cu_k, max_q, max_k, *options, return_mass,
                                              return_probs)  # fmt: skip
    else:
        out, mass, probs = _cpu_forward(q, k, v, bias, alibi, cu_q, cu_k, max_q, max_k, *options, return_probs)

    def none():  # outputs of a custom op may not alias each other
        return q.new_empty(0, dtype=torch.float32)

    return out, (mass if return_mass else none()), (probs if return_probs else none())


@_fwd.register_fake
def _(q, k, v, bias, alibi, cu_q, cu_k, max_q, max_k, scale, causal, window_left, window_right, softcap, dropout_p,
      seed, return_mass, return_probs):  # fmt: skip
    heads, varlen = q.shape[-2], cu_q is not None
    mass = ((heads, q.shape[0]) if varlen else (q.shape[0], heads, q.shape[1])) if return_mass else (0,)
    lengths = (max_q, max_k) if varlen else (q.shape[1], k.shape[1])
    probs = ((cu_q.shape[0] - 1 if varlen else q.shape[0]), heads, *lengths) if return_probs else (0,)
    return torch.empty_like(q), q.new_empty(mass, dtype=torch.float32), q.new_empty(probs, dtype=torch.float32)


@torch.library.custom_op("flash_sigmoid::bwd", mutates_args=())
def _bwd(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
    alibi: torch.Tensor | None, cu_q: torch.Tensor | None, cu_k: torch.Tensor | None, max_q: int, max_k: int,
    scale: float, causal: bool, window_left: int, window_right: int, softcap: float, dropout_p: float, seed: int,
    need_dbias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    options = (scale, causal, (window_left, window_right), softcap, dropout_p, seed)
    if use_triton(q):
        return kernels().backward(do, q, k, v, bias, alibi, cu_q, cu_k, max_q, max_k, *options, need_dbias)
    return _cpu_backward(do, q, k, v, bias, alibi, cu_q, cu_k, *options)


@_bwd.register_fake
def _(do, q, k, v, bias, alibi, cu_q, cu_k, max_q, max_k, scale, causal, window_left, window_right, softcap,
      dropout_p, seed, need_dbias):  # fmt: skip
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(bias)


class FlashSigmoidFunction(torch.autograd.Function):
    """out, mass, probs = f(q, k, v, bias [B, H], ...); gradients for q, k, v and the bias (mass
    and probs have none)."""

    @staticmethod
    def forward(ctx, q, k, v, bias, alibi, cu_q, cu_k, max_q, max_k, scale, causal, window, softcap, dropout_p,
                seed, return_mass, return_probs=False):  # fmt: skip
        meta = (max_q, max_k, scale, causal, *window, softcap, dropout_p, seed)
        out, mass, probs = _fwd(q, k, v, bias, alibi, cu_q, cu_k, *meta, return_mass, return_probs)
        ctx.save_for_backward(q, k, v, bias, alibi, cu_q, cu_k)
        ctx.meta = meta
        ctx.mark_non_differentiable(mass, probs)
        return out, mass, probs

    @staticmethod
    def backward(ctx, dout, _dmass, _dprobs):
        q, k, v, bias, alibi, cu_q, cu_k = ctx.saved_tensors
        need_dbias = ctx.needs_input_grad[3]
        dq, dk, dv, dbias = _bwd(dout, q, k, v, bias, alibi, cu_q, cu_k, *ctx.meta, need_dbias)
        return dq, dk, dv, (dbias if need_dbias else None), *([None] * 13)


# ---- argument checks -----------------------------------------------------------------------------


def fail(message: str):
    raise ValueError(f"flash_sigmoid: {message}")


def _check_qkv(q, k, v, packed: bool):
    names = ("q", "k", "v")
    want = 3 if packed else 4
    layout = "[total_tokens, heads, head_dim]" if packed else "[batch, seqlen, heads, head_dim]"
    for name, t in zip(names, (q, k, v)):
        if not isinstance(t, torch.Tensor):
            fail(f"{name} must be a torch.Tensor, got {type(t).__name__}.")
        if t.ndim != want:
            fail(f"{name} must be {layout}, got shape {tuple(t.shape)}.")
        if t.dtype != q.dtype or t.device != q.device:
            fail(
                f"q, k, v must share dtype and device; {name} is {t.dtype} on {t.device}, q is {q.dtype} on {q.device}."
            )
    if q.dtype not in KERNEL_DTYPES and not (q.dtype == torch.float64 and not use_triton(q)):
        fail(f"dtype {q.dtype} is not supported: use float16, bfloat16 or float32 (float64 on the CPU path only).")
    if k.shape != v.shape:
        fail(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}.")
    if not packed and (k.shape[0] != q.shape[0]):
        fail(f"q and k have different batch sizes ({q.shape[0]} and {k.shape[0]}).")
    head_dim, heads, kv_heads = q.shape[-1], q.shape[-2], k.shape[-2]
    if k.shape[-1] != head_dim or not 0 < head_dim <= MAX_HEAD_DIM:
        fail(f"head_dim must be equal for q, k, v and in 1..{MAX_HEAD_DIM}; got {head_dim} and {k.shape[-1]}.")
    if kv_heads == 0 or heads % kv_heads:
        fail(f"the number of query heads ({heads}) must be a multiple of the number of key/value heads ({kv_heads}).")


def window_bounds(window_size, causal: bool, seqlen_k: int) -> tuple[int, int]:
    """(left, right) as flash-attn resolves `window_size` (a pair of ints, numpy ints or a
    2-element tensor) for `seqlen_k` keys (the padded length, max_seqlen_k, or a KV cache's
    capacity): a side ≥ seqlen_k is unbounded (−1); causal sets the right side to 0; an
    unbounded right side opposite a bounded left one becomes seqlen_k, so (L, −1) lets no query
    reach more than seqlen_k keys past its diagonal — rows of a batch with seqlen_q > seqlen_k
    + 1 can then see no key at all. A left side of seqlen_k can never exclude a key, so it stays
    −1 here (flash-attn writes seqlen_k)."""
    try:
        pair = [int(w) for w in (window_size.tolist() if hasattr(window_size, "tolist") else window_size)]
    except (TypeError, ValueError):
        pair = []
    if len(pair) != 2:
        fail(f"window_size must be a pair of ints (left, right), got {window_size!r}.")
    if min(pair) < -1:
        fail(f"window_size={tuple(pair)}: sizes must be >= 0, or -1 for unbounded.")
    left, right = (-1 if w >= seqlen_k else w for w in pair)
    if causal:
        right = 0
    elif left >= 0 and right < 0:
        right = seqlen_k
    return left, right


def check_options(q, dropout_p, softcap, alibi_slopes, batch):
    """The alibi slopes at unit stride (the kernels index them so); the option values checked."""
    if not (isinstance(dropout_p, (int, float)) and 0 <= dropout_p < 1):
        fail(f"dropout_p must be a float in [0, 1), got {dropout_p!r}.")
    if not (isinstance(softcap, (int, float)) and math.isfinite(softcap) and softcap >= 0):
        fail(f"softcap must be a finite float >= 0 (0: off), got {softcap!r}.")
    if alibi_slopes is None:
        return None
    heads = q.shape[-2]
    if not isinstance(alibi_slopes, torch.Tensor) or alibi_slopes.dtype != torch.float32:
        fail("alibi_slopes must be a float32 tensor of shape [heads] or [batch, heads].")
    if alibi_slopes.device != q.device or tuple(alibi_slopes.shape) not in ((heads,), (batch, heads)):
        fail(f"alibi_slopes has shape {tuple(alibi_slopes.shape)} on {alibi_slopes.device}; expected ({heads},) "
              f"or ({batch}, {heads}) on {q.device}.")  # fmt: skip
    return alibi_slopes.contiguous()


def _dropout_seed(dropout_p, dropout_seed) -> int:
    """The dropout pattern's seed: the caller's, or drawn from torch's CPU generator (no device
    sync; saved and restored with the other RNG states by checkpoints)."""
    if dropout_seed is not None:
        if not isinstance(dropout_seed, int) or not 0 <= dropout_seed < 2**63:
            fail(f"dropout_seed must be an int in [0, 2**63), got {dropout_seed!r}.")
        return dropout_seed
    if not dropout_p:
        return 0
    if torch.compiler.is_compiling():
        fail("dropout_p > 0 under torch.compile needs dropout_seed=<int>: drawing a seed from torch's generator "
              "would break the graph.")  # fmt: skip
    return int(torch.randint(0, 2**62, ()))


def bias_table(sigmoid_bias, q, batch: int) -> torch.Tensor:
    """The bias as a contiguous [batch, heads] table, fp32 (fp64 for fp64 inputs); expanded from
    a float, [] or [heads] (autograd sums the gradient back to the caller's shape)."""
    heads, dtype = q.shape[-2], torch.promote_types(q.dtype, torch.float32)
    if isinstance(sigmoid_bias, torch.Tensor):
        if tuple(sigmoid_bias.shape) not in ((), (heads,), (batch, heads)):
            fail(f"sigmoid_bias must be a float or a tensor of shape [], [{heads}] or [{batch}, {heads}], "
                  f"got {tuple(sigmoid_bias.shape)}.")  # fmt: skip
        if sigmoid_bias.ndim and sigmoid_bias.device != q.device:
            fail(f"sigmoid_bias is on {sigmoid_bias.device}, q on {q.device}.")
        return sigmoid_bias.to(device=q.device, dtype=dtype).expand(batch, heads).contiguous()
    if not isinstance(sigmoid_bias, (int, float)) or not math.isfinite(sigmoid_bias):
        fail(f"sigmoid_bias must be a finite float or a tensor, got {sigmoid_bias!r}.")
    return torch.full((batch, heads), float(sigmoid_bias), device=q.device, dtype=dtype)


def check_cu_seqlens(cu_q, cu_k, max_q, max_k, total_q, total_k, device):
    """Shapes and types always; values where that costs no device sync (CPU tensors). On CUDA
    the values are asserted on the device (torch._assert_async), which raises at the next
    synchronisation instead of stalling every call."""
    for name, cu in (("cu_seqlens_q", cu_q), ("cu_seqlens_k", cu_k)):
        if not isinstance(cu, torch.Tensor) or cu.dtype != torch.int32 or cu.ndim != 1 or cu.numel() < 2:
            fail(f"{name} must be a 1-D int32 tensor of batch + 1 offsets.")
        if cu.device != device:
            fail(f"{name} is on {cu.device}, q on {device}.")
    if cu_q.numel() != cu_k.numel():
        fail(f"cu_seqlens_q and cu_seqlens_k describe {cu_q.numel() - 1} and {cu_k.numel() - 1} sequences.")
    if torch.compiler.is_compiling():
        return  # value checks need the host; under compile the caller vouches for them
    for name, cu, max_len, total in (("q", cu_q, max_q, total_q), ("k", cu_k, max_k, total_k)):
        lengths = cu.diff()
        bad = torch.stack([cu[0] != 0, cu[-1] > total, (lengths < 0).any(), lengths.max() > max_len]).any()
        message = (f"flash_sigmoid: cu_seqlens_{name} must start at 0, not decrease, end at most at the {total} "
                   f"packed tokens, and no sequence may exceed max_seqlen_{name}={max_len}")  # fmt: skip
        if cu.is_cuda:
            torch._assert_async(~bad, message)
        elif bad.item():
            fail(f"{message.removeprefix('flash_sigmoid: ')}; got {cu.tolist()}.")


def attention(q, k, v, cu_q, cu_k, max_q, max_k, *, dropout_p, softmax_scale, causal, window_size, softcap,
              alibi_slopes, return_attn_probs, sigmoid_bias, return_attn_mass, dropout_seed=None):  # fmt: skip
    """Checks, then the autograd function: what every padded and varlen entry point calls."""
    packed = cu_q is not None
    _check_qkv(q, k, v, packed)
    batch = cu_q.numel() - 1 if packed else q.shape[0]
    alibi_slopes = check_options(q, dropout_p, softcap, alibi_slopes, batch)
    window = window_bounds(window_size, causal, max_k if packed else k.shape[1])
    seed = _dropout_seed(dropout_p, dropout_seed)
    if packed:
        check_cu_seqlens(cu_q, cu_k, max_q, max_k, q.shape[0], k.shape[0], q.device)
        cu_q, cu_k = cu_q.contiguous(), cu_k.contiguous()  # the kernels read offsets at unit stride
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    bias = bias_table(sigmoid_bias, q, batch)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    options = (scale, causal, window, float(softcap), float(dropout_p), seed)
    out, mass, probs = FlashSigmoidFunction.apply(q, k, v, bias, alibi_slopes, cu_q, cu_k, max_q, max_k, *options,
                                                  return_attn_mass or return_attn_probs, return_attn_probs)  # fmt: skip
    if return_attn_probs:  # flash-attn's (out, softmax_lse, S_dmask), the row mass in the lse's place
        return out, mass, probs
    return (out, mass) if return_attn_mass else out
