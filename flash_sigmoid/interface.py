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


def _use_triton(t: torch.Tensor) -> bool:
    return t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def _kernels():
    from . import triton_kernels  # imported on first use: Triton fixes interpreter mode at import

    return triton_kernels


# ---- CPU path over packed sequences --------------------------------------------------------------


def _per_sequence(fn, q_like, k_like, bias, alibi, cu_q, cu_k, **kw):
    """`fn` on each sequence of packed varlen tensors as a batch of one, with its bias row (and
    its ALiBi slopes when they are per sequence). Yields (query rows, key rows, result)."""
    bounds_q, bounds_k = cu_q.tolist(), cu_k.tolist()  # CPU tensors: no device to wait for
    for b in range(len(bounds_q) - 1):
        sq, sk = slice(bounds_q[b], bounds_q[b + 1]), slice(bounds_k[b], bounds_k[b + 1])
        slopes = alibi[b : b + 1] if alibi is not None and alibi.ndim == 2 else alibi
        tensors = [t[sq][None] for t in q_like] + [t[sk][None] for t in k_like]
        yield sq, sk, fn(*tensors, bias=bias[b : b + 1], alibi_slopes=slopes, **kw)


@torch.autocast("cpu", enabled=False)  # the path computes in fp32 itself; autocast would make it bf16
def _cpu_forward(q, k, v, bias, alibi, cu_q, cu_k, scale, causal, window):
    kw = dict(scale=scale, causal=causal, window=window)
    if cu_q is None:
        return reference.chunked_forward(q, k, v, bias=bias, alibi_slopes=alibi, **kw)
    # rows beyond the last sequence (cu_seqlens[-1] < total) are not attention rows: zeros
    out, mass = torch.zeros_like(q), q.new_zeros(q.shape[1], q.shape[0], dtype=torch.float32)
    for sq, _, (o, m) in _per_sequence(reference.chunked_forward, (q,), (k, v), bias, alibi, cu_q, cu_k, **kw):
        out[sq], mass[:, sq] = o[0], m[0]
    return out, mass


@torch.autocast("cpu", enabled=False)
def _cpu_backward(do, q, k, v, bias, alibi, cu_q, cu_k, scale, causal, window):
    kw = dict(scale=scale, causal=causal, window=window)
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
    window_left: int, window_right: int, return_mass: bool,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    window = (window_left, window_right)
    if _use_triton(q):
        out, mass = _kernels().forward(
            q, k, v, bias, alibi, cu_q, cu_k, max_q, max_k, scale, causal, window, return_mass
        )
    else:
        out, mass = _cpu_forward(q, k, v, bias, alibi, cu_q, cu_k, scale, causal, window)
    return out, (mass if return_mass else q.new_empty(0, dtype=torch.float32))


@_fwd.register_fake
def _(q, k, v, bias, alibi, cu_q, cu_k, max_q, max_k, scale, causal, window_left, window_right, return_mass):
    heads = q.shape[-2]
    shape = ((heads, q.shape[0]) if cu_q is not None else (q.shape[0], heads, q.shape[1])) if return_mass else (0,)
    return torch.empty_like(q), q.new_empty(shape, dtype=torch.float32)


@torch.library.custom_op("flash_sigmoid::bwd", mutates_args=())
def _bwd(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
    alibi: torch.Tensor | None, cu_q: torch.Tensor | None, cu_k: torch.Tensor | None, max_q: int, max_k: int,
    scale: float, causal: bool, window_left: int, window_right: int, need_dbias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    window = (window_left, window_right)
    if _use_triton(q):
        args = (do, q, k, v, bias, alibi, cu_q, cu_k, max_q, max_k, scale, causal, window, need_dbias)
        return _kernels().backward(*args)
    return _cpu_backward(do, q, k, v, bias, alibi, cu_q, cu_k, scale, causal, window)


@_bwd.register_fake
def _(do, q, k, v, bias, alibi, cu_q, cu_k, max_q, max_k, scale, causal, window_left, window_right, need_dbias):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(bias)


class FlashSigmoidFunction(torch.autograd.Function):
    """out, mass = f(q, k, v, bias [B, H], ...); gradients for q, k, v and the bias (mass has none)."""

    @staticmethod
    def forward(ctx, q, k, v, bias, alibi, cu_q, cu_k, max_q, max_k, scale, causal, window, return_mass):
        out, mass = _fwd(q, k, v, bias, alibi, cu_q, cu_k, max_q, max_k, scale, causal, *window, return_mass)
        ctx.save_for_backward(q, k, v, bias, alibi, cu_q, cu_k)
        ctx.meta = (max_q, max_k, scale, causal, window)
        ctx.mark_non_differentiable(mass)
        return out, mass

    @staticmethod
    def backward(ctx, dout, _dmass):
        q, k, v, bias, alibi, cu_q, cu_k = ctx.saved_tensors
        max_q, max_k, scale, causal, window = ctx.meta
        need_dbias = ctx.needs_input_grad[3]
        dq, dk, dv, dbias = _bwd(
            dout, q, k, v, bias, alibi, cu_q, cu_k, max_q, max_k, scale, causal, *window, need_dbias
        )
        return dq, dk, dv, (dbias if need_dbias else None), *([None] * 9)


# ---- argument checks -----------------------------------------------------------------------------


def _fail(message: str):
    raise ValueError(f"flash_sigmoid: {message}")


def _check_qkv(q, k, v, packed: bool):
    names = ("q", "k", "v")
    want = 3 if packed else 4
    layout = "[total_tokens, heads, head_dim]" if packed else "[batch, seqlen, heads, head_dim]"
    for name, t in zip(names, (q, k, v)):
        if not isinstance(t, torch.Tensor):
            _fail(f"{name} must be a torch.Tensor, got {type(t).__name__}.")
        if t.ndim != want:
            _fail(f"{name} must be {layout}, got shape {tuple(t.shape)}.")
        if t.dtype != q.dtype or t.device != q.device:
            _fail(
                f"q, k, v must share dtype and device; {name} is {t.dtype} on {t.device}, q is {q.dtype} on {q.device}."
            )
    if q.dtype not in KERNEL_DTYPES and not (q.dtype == torch.float64 and not _use_triton(q)):
        _fail(f"dtype {q.dtype} is not supported: use float16, bfloat16 or float32 (float64 on the CPU path only).")
    if k.shape != v.shape:
        _fail(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}.")
    if not packed and (k.shape[0] != q.shape[0]):
        _fail(f"q and k have different batch sizes ({q.shape[0]} and {k.shape[0]}).")
    head_dim, heads, kv_heads = q.shape[-1], q.shape[-2], k.shape[-2]
    if k.shape[-1] != head_dim or not 0 < head_dim <= MAX_HEAD_DIM:
        _fail(f"head_dim must be equal for q, k, v and in 1..{MAX_HEAD_DIM}; got {head_dim} and {k.shape[-1]}.")
    if kv_heads == 0 or heads % kv_heads:
        _fail(f"the number of query heads ({heads}) must be a multiple of the number of key/value heads ({kv_heads}).")


def _check_options(q, dropout_p, window_size, alibi_slopes, return_attn_probs, batch):
    if dropout_p:
        raise NotImplementedError("flash_sigmoid: dropout_p > 0 is not supported; apply dropout outside attention.")
    if return_attn_probs:
        raise NotImplementedError(
            "flash_sigmoid: return_attn_probs is not supported; use return_attn_mass=True for the per-row attention "
            "mass, or flash_sigmoid.reference.reference_attention(..., return_weights=True) for the matrix."
        )
    if not (
        isinstance(window_size, (tuple, list))
        and len(window_size) == 2
        and all(isinstance(w, int) for w in window_size)
    ):
        _fail(f"window_size must be a pair of ints (left, right), got {window_size!r}.")
    if min(window_size) < -1:
        _fail(f"window_size={tuple(window_size)}: sizes must be >= 0, or -1 for unbounded.")
    if alibi_slopes is not None:
        heads = q.shape[-2]
        if not isinstance(alibi_slopes, torch.Tensor) or alibi_slopes.dtype != torch.float32:
            _fail("alibi_slopes must be a float32 tensor of shape [heads] or [batch, heads].")
        if alibi_slopes.device != q.device or tuple(alibi_slopes.shape) not in ((heads,), (batch, heads)):
            _fail(f"alibi_slopes has shape {tuple(alibi_slopes.shape)} on {alibi_slopes.device}; expected ({heads},) "
                  f"or ({batch}, {heads}) on {q.device}.")  # fmt: skip


def _bias_table(sigmoid_bias, q, batch: int) -> torch.Tensor:
    """The bias as a contiguous [batch, heads] table, fp32 (fp64 for fp64 inputs); expanded from
    a float, [] or [heads] (autograd sums the gradient back to the caller's shape)."""
    heads, dtype = q.shape[-2], torch.promote_types(q.dtype, torch.float32)
    if isinstance(sigmoid_bias, torch.Tensor):
        if tuple(sigmoid_bias.shape) not in ((), (heads,), (batch, heads)):
            _fail(f"sigmoid_bias must be a float or a tensor of shape [], [{heads}] or [{batch}, {heads}], "
                  f"got {tuple(sigmoid_bias.shape)}.")  # fmt: skip
        if sigmoid_bias.ndim and sigmoid_bias.device != q.device:
            _fail(f"sigmoid_bias is on {sigmoid_bias.device}, q on {q.device}.")
        return sigmoid_bias.to(device=q.device, dtype=dtype).expand(batch, heads).contiguous()
    if not isinstance(sigmoid_bias, (int, float)) or not math.isfinite(sigmoid_bias):
        _fail(f"sigmoid_bias must be a finite float or a tensor, got {sigmoid_bias!r}.")
    return torch.full((batch, heads), float(sigmoid_bias), device=q.device, dtype=dtype)


def _check_cu_seqlens(cu_q, cu_k, max_q, max_k, total_q, total_k, device):
    """Shapes and types always; values where that costs no device sync (CPU tensors). On CUDA
    the values are asserted on the device (torch._assert_async), which raises at the next
    synchronisation instead of stalling every call."""
    for name, cu in (("cu_seqlens_q", cu_q), ("cu_seqlens_k", cu_k)):
        if not isinstance(cu, torch.Tensor) or cu.dtype != torch.int32 or cu.ndim != 1 or cu.numel() < 2:
            _fail(f"{name} must be a 1-D int32 tensor of batch + 1 offsets.")
        if cu.device != device:
            _fail(f"{name} is on {cu.device}, q on {device}.")
    if cu_q.numel() != cu_k.numel():
        _fail(f"cu_seqlens_q and cu_seqlens_k describe {cu_q.numel() - 1} and {cu_k.numel() - 1} sequences.")
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
            _fail(f"{message.removeprefix('flash_sigmoid: ')}; got {cu.tolist()}.")


def _run(q, k, v, cu_q, cu_k, max_q, max_k, *, dropout_p, softmax_scale, causal, window_size, alibi_slopes,
         return_attn_probs, sigmoid_bias, return_attn_mass):  # fmt: skip
    packed = cu_q is not None
    _check_qkv(q, k, v, packed)
    batch = cu_q.numel() - 1 if packed else q.shape[0]
    _check_options(q, dropout_p, window_size, alibi_slopes, return_attn_probs, batch)
    if packed:
        _check_cu_seqlens(cu_q, cu_k, max_q, max_k, q.shape[0], k.shape[0], q.device)
        cu_q, cu_k = cu_q.contiguous(), cu_k.contiguous()  # the kernels read offsets at unit stride
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    window = (window_size[0], 0) if causal else tuple(window_size)  # causal caps the right side, as flash-attn
    bias = _bias_table(sigmoid_bias, q, batch)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out, mass = FlashSigmoidFunction.apply(q, k, v, bias, alibi_slopes, cu_q, cu_k, max_q, max_k, scale, causal,
                                           window, return_attn_mass)  # fmt: skip
    return (out, mass) if return_attn_mass else out
