"""Attention backends: functions `(q, k, v, spec) -> out` registered by name, each described
by data (`Backend`).

Tensors are [batch, seq, heads, head_dim] in and out (FlashAttention's layout); k and v may
have fewer heads (GQA / MQA). Masks are bottom-right aligned as in flash-attn >= 2.1, per
sequence when the batch is right-padded; their one definition is FlashSigmoid's
`attention_mask`. A backend declares which options it honours; `AttentionConfig` refuses the
rest at construction. To add one: write the function, decorate it with `register_backend`
(its activation, the options it honours, its naive twin, its kernel under context
parallelism, whether it writes a KV cache itself), and add `configs/attention/NAME.yaml`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from einops import rearrange

import flash_sigmoid
from flash_sigmoid.reference import attention_logits, attention_mask, logit_bias, sigmoid_weights, weighted_values

from .masks import Padding
from .ops import at_least_fp32, repeat_kv

if TYPE_CHECKING:
    from ..probes import AttentionProbe
    from .kvcache import KVCache


@dataclass(frozen=True)
class AttentionSpec:
    """What one call needs beyond q, k, v (built by the `Attention` module)."""

    scale: float
    causal: bool = False
    window: tuple[int, int] = (-1, -1)  # (left, right) key distance; −1 = unbounded
    dropout_p: float = 0.0
    sigmoid_bias: float | torch.Tensor | None = None  # float, [], [H], [B, H] or per row [B, H, Tq]
    alibi_slopes: torch.Tensor | None = None  # (H,) fp32
    q_padding: Padding | None = None  # right-padded batches
    k_padding: Padding | None = None
    probe: AttentionProbe | None = None  # set while diagnostics record: gets the weights (or the mass)
    kv_cache: KVCache | None = None  # decoding with flash_sigmoid: k, v are the new tokens, appended in place
    sink: torch.Tensor | None = None  # (H,) softmax: one more logit per head in the normaliser, with no value

    @property
    def q_lengths(self) -> torch.Tensor | None:
        return None if self.q_padding is None else self.q_padding.lengths

    @property
    def k_lengths(self) -> torch.Tensor | None:
        return None if self.k_padding is None else self.k_padding.lengths

    def mask(self, q, k, dtype):
        return attention_mask(q.shape[1], k.shape[1], self.causal, self.window, self.alibi_slopes, self.q_lengths,
                              self.k_lengths, device=q.device, dtype=dtype)  # fmt: skip

    def attended(self, q, k) -> torch.Tensor:
        """(B|1, 1, Tq, Tk) bool: the (query, key) pairs that attend, padded queries excluded."""
        allowed, _ = self.mask(q, k, torch.float32)
        return allowed if self.q_padding is None else allowed & self.q_padding.real[:, None, :, None]

    def row_weights(self, q, k, activation: str, rows: int = 256) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor]]:
        """(rows, their scores q·kᵀ·scale and their weights, each (B, H, rows, Tk) fp32) for `rows`
        query rows at a time: the weights the naive backend of `activation` computes -- masks,
        ALiBi, the sigmoid bias, the sink -- without the whole matrix at once (the probes' view of
        a fused backend)."""
        allowed, alibi = self.mask(q, k, torch.float32)
        bias = self.sigmoid_bias if activation == "sigmoid" else None
        for lo in range(0, q.shape[1], rows):
            part = slice(lo, lo + rows)
            scores = attention_logits(q[:, part], k, self.scale, dtype=torch.float32)  # no bias, no ALiBi
            logits = scores if alibi is None else scores + alibi[..., part, :]
            if bias is not None:
                row_bias = bias[..., part] if isinstance(bias, torch.Tensor) and bias.ndim == 3 else bias
                logits = logits + logit_bias(row_bias, torch.float32, q.device)
            attends = allowed[..., part, :]
            if activation == "sigmoid":
                yield part, scores, torch.sigmoid(logits).masked_fill(~attends, 0.0)
                continue
            weights = softmax_with_sink(logits.masked_fill(~attends, float("-inf")), self.sink)
            yield part, scores, weights.nan_to_num(0.0)  # a row with no key: 0


BackendFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, AttentionSpec], torch.Tensor]

# options a backend may honour; AttentionConfig checks the ones a config switches on
OPTIONS = ("causal", "window", "alibi", "dropout", "sigmoid_bias", "per_row_bias", "length_norm", "sink")


@dataclass(frozen=True)
class Backend:
    """A backend as data.

    fn: the attention function. activation: "softmax" | "sigmoid". supports: the OPTIONS it
    honours. reference: its naive twin, the registered backend computing the same attention with
    the weight matrix materialised (what the Lipschitz estimate differentiates through; itself
    for a naive backend). ring_kernel: the per-block kernel of `ring.ring_attention` that serves
    it under context parallelism ("naive" | "flash_sigmoid"), None when it cannot run sharded.
    writes_kv_cache: decoding hands it the cache and only the new keys and values
    (`spec.kv_cache`), which it appends itself; otherwise the layer appends them first."""

    fn: BackendFn
    activation: str
    supports: frozenset[str]
    reference: str
    ring_kernel: str | None = None
    writes_kv_cache: bool = False


BACKENDS: dict[str, Backend] = {}


def register_backend(name: str, activation: str, supports: set[str], *, reference: str | None = None,
                     ring_kernel: str | None = None, writes_kv_cache: bool = False):  # fmt: skip
    """Register `fn(q, k, v, spec) -> out` under `name` (a decorator), described by the
    `Backend` fields: q (B, Tq, H, D), k and v (B, Tk, Hk, D), `spec` an `AttentionSpec`; out
    (B, Tq, H, D). `supports` names the `OPTIONS` it honours (a config that switches on another
    is refused at start-up, naming the backends that can); `reference` its naive twin,
    registered first; `ring_kernel` what serves it under context parallelism. Then
    `configs/attention/NAME.yaml` (starting from softmax.yaml or sigmoid.yaml) selects it."""
    unknown = set(supports) - set(OPTIONS)
    if unknown:
        raise ValueError(f"backend {name!r} declares unknown options {sorted(unknown)}; known: {OPTIONS}.")
    reference = reference or name
    if reference != name and reference not in BACKENDS:
        raise ValueError(f"backend {name!r} names {reference!r} as its naive twin; register that one first.")

    def decorator(fn: BackendFn) -> BackendFn:
        BACKENDS[name] = Backend(fn, activation, frozenset(supports), reference, ring_kernel, writes_kv_cache)
        return fn

    return decorator


def backends_supporting(option: str) -> list[str]:
    return sorted(name for name, b in BACKENDS.items() if option in b.supports)


# ---- naive backends: materialise the [B, H, Tq, Tk] matrix (the diagnostic reference) ------------


def _exact(backend: BackendFn) -> BackendFn:
    """Run a naive backend in fp32 (fp64 kept) even under autocast, which would otherwise run
    its einsums in bf16/fp16: it is the reference, and its matrix feeds the diagnostics. The
    output comes back in the dtype of q."""

    @functools.wraps(backend)
    def wrapper(q, k, v, spec):
        device = q.device.type  # (the meta device, used to size models, has no autocast)
        with torch.autocast(device, enabled=False) if torch.amp.is_autocast_available(device) else nullcontext():
            return backend(at_least_fp32(q), at_least_fp32(k), at_least_fp32(v), spec).to(q.dtype)

    return wrapper


def _dropout(weights: torch.Tensor, p: float) -> torch.Tensor:
    return F.dropout(weights, p) if p else weights


def _softmax_inputs(q, k, spec):
    """Scaled scores (B, H, Tq, Tk) with ALiBi and −inf at masked pairs, and which rows attend to
    anything. A row with no key (e.g. a padded query beyond a window) gets all-zero weights
    instead of softmax's NaN, as in flash-attn."""
    allowed, alibi = spec.mask(q, k, q.dtype)
    scores = attention_logits(q, k, spec.scale, alibi=alibi)  # (B, H, Tq, Tk)
    any_key = allowed.any(-1, keepdim=True)
    return scores.masked_fill(~(allowed | ~any_key), float("-inf")), any_key


def softmax_with_sink(scores: torch.Tensor, sink: torch.Tensor | None) -> torch.Tensor:
    """softmax over the last dim of scores (B, H, Tq, Tk); with a sink (H,), one more logit per
    head in each row's normaliser: its column takes its share of the row, then goes (no value)."""
    if sink is None:
        return torch.softmax(scores, dim=-1)
    column = sink.to(scores.dtype).reshape(1, -1, 1, 1).expand(*scores.shape[:3], 1)
    return torch.softmax(torch.cat([scores, column], -1), dim=-1)[..., :-1]


@register_backend("softmax", "softmax", {"causal", "window", "alibi", "dropout", "sink"}, ring_kernel="naive")
@_exact
def softmax_attention(q, k, v, spec: AttentionSpec) -> torch.Tensor:
    scores, any_key = _softmax_inputs(q, k, spec)
    weights = softmax_with_sink(scores, spec.sink) * any_key  # (B, H, Tq, Tk)
    if spec.probe is not None:
        weights = spec.probe(weights, spec.q_padding)
    return weighted_values(_dropout(weights, spec.dropout_p), v)  # (B, Tq, H, D)


@register_backend(
    "sigmoid",
    "sigmoid",
    {"causal", "window", "alibi", "dropout", "sigmoid_bias", "per_row_bias", "length_norm"},
    ring_kernel="naive",
)
@_exact
def sigmoid_attention(q, k, v, spec: AttentionSpec) -> torch.Tensor:
    """sigmoid(q·kᵀ·scale + b)·v with the matrix materialised: FlashSigmoid's exact reference."""
    weights = sigmoid_weights(
        q, k, scale=spec.scale, bias=0.0 if spec.sigmoid_bias is None else spec.sigmoid_bias, causal=spec.causal,
        window=spec.window, alibi_slopes=spec.alibi_slopes, q_lengths=spec.q_lengths, k_lengths=spec.k_lengths,
    )  # fmt: skip
    if spec.probe is not None:
        weights = spec.probe(weights, spec.q_padding)
    return weighted_values(_dropout(weights, spec.dropout_p), v)  # (B, Tq, H, D)


# ---- fused backends ----------------------------------------------------------------------------------


def _varlen(fn, q, k, v, spec: AttentionSpec, **kw):
    """Run a flash-attn-style varlen function on a right-padded batch; padded rows come back 0.
    With return_attn_mass, also the mass as (B, H, Tq). No host sync: see `masks.Padding`."""
    q_pad = spec.q_padding or Padding.of(spec.k_lengths.new_full((q.shape[0],), q.shape[1]), q.shape[1])
    k_pad = spec.k_padding
    result = fn(q_pad.pack(q), k_pad.pack(k), k_pad.pack(v), q_pad.cu_seqlens, k_pad.cu_seqlens, q.shape[1],
                k.shape[1], **kw)  # fmt: skip
    if not kw.get("return_attn_mass"):
        return q_pad.unpack(result)
    out, mass = result  # mass: (H, B·Tq)
    return q_pad.unpack(out), q_pad.unpack(mass.T).permute(0, 2, 1)


try:  # optional extra: pip install 'attention-simulator[flash-attn]'
    import flash_attn as _flash_attn
except ImportError:  # pragma: no cover - depends on the environment
    _flash_attn = None


def _with_sink_key(q, k, v, spec: AttentionSpec):
    """q, k, v with the sink as one more key in front of every sequence: an extra channel, 1 in
    every query and sink/scale in the sink's key (0 in the others), makes its logit the sink's
    for every query; its value is 0. Channels are padded to a multiple of 8 (the fused kernels'
    granularity); the scale stays the original head size's."""
    batch, _, heads, dim = q.shape
    pad = 8 - dim % 8  # >= 1: the extra channel, then zeros
    q = torch.cat([q, q.new_ones(*q.shape[:3], 1), q.new_zeros(*q.shape[:3], pad - 1)], -1)  # (B, Tq, H, D + pad)
    sink = (spec.sink.to(q.dtype) / spec.scale).reshape(1, 1, heads, 1).expand(batch, 1, heads, 1)
    sink_key = F.pad(sink, (dim, pad - 1))  # (B, 1, H, D + pad)
    k = torch.cat([sink_key, F.pad(repeat_kv(k, heads), (0, pad))], 1)  # (B, 1 + Tk, H, D + pad)
    v = F.pad(repeat_kv(v, heads), (0, 0, 0, 0, 1, 0))  # (B, 1 + Tk, H, D): the sink's value is 0
    return q, k, v


@register_backend("flash_softmax", "softmax", {"causal", "window", "alibi", "dropout", "sink"}, reference="softmax")
def flash_softmax_attention(q, k, v, spec: AttentionSpec) -> torch.Tensor:
    """flash-attn 2 on CUDA fp16/bf16 when installed; otherwise PyTorch SDPA. With a sink, SDPA
    with the sink as one more key (`_with_sink_key`): flash-attn has no sink."""
    if spec.sink is not None:
        return _sdpa(q, k, v, spec)
    if _flash_attn is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        kw = dict(dropout_p=spec.dropout_p, softmax_scale=spec.scale, causal=spec.causal, window_size=spec.window,
                  alibi_slopes=spec.alibi_slopes)  # fmt: skip
        if spec.k_padding is not None:
            return _varlen(_flash_attn.flash_attn_varlen_func, q, k, v, spec, **kw)
        return _flash_attn.flash_attn_func(q, k, v, **kw)
    return _sdpa(q, k, v, spec)


def _sdpa(q, k, v, spec: AttentionSpec) -> torch.Tensor:
    """PyTorch's scaled_dot_product_attention: is_causal where its top-left alignment agrees,
    else an explicit mask (bottom-right aligned, padding, window, ALiBi, the sink's key)."""
    simple = spec.window == (-1, -1) and spec.alibi_slopes is None and spec.k_lengths is None and spec.sink is None
    heads = q.shape[2]
    allowed, alibi = spec.mask(q, k, at_least_fp32(q).dtype) if not simple else (None, None)
    if spec.sink is not None:  # the sink's key: in front, always attended, no ALiBi distance
        q, k, v = _with_sink_key(q, k, v, spec)
        allowed = torch.cat([allowed.new_ones(*allowed.shape[:-1], 1), allowed], -1)
        alibi = None if alibi is None else F.pad(alibi, (1, 0))
    q_, k_, v_ = (rearrange(t, "b t h d -> b h t d") for t in (q, repeat_kv(k, heads), repeat_kv(v, heads)))
    if simple and (not spec.causal or q.shape[1] == k.shape[1]):  # SDPA's is_causal is top-left aligned
        out = F.scaled_dot_product_attention(q_, k_, v_, dropout_p=spec.dropout_p, is_causal=spec.causal,
                                             scale=spec.scale)  # fmt: skip
        return rearrange(out, "b h t d -> b t h d")
    if allowed is None:
        allowed, alibi = spec.mask(q, k, at_least_fp32(q).dtype)
    any_key = allowed.any(-1, keepdim=True)
    mask = allowed | ~any_key if alibi is None else alibi.masked_fill(~(allowed | ~any_key), float("-inf"))
    out = F.scaled_dot_product_attention(q_, k_, v_, attn_mask=mask.to(q.dtype) if alibi is not None else mask,
                                         dropout_p=spec.dropout_p, scale=spec.scale)  # fmt: skip
    return rearrange(out * any_key.to(out.dtype), "b h t d -> b t h d")


@register_backend(
    "flash_sigmoid",
    "sigmoid",
    {"causal", "window", "alibi", "dropout", "sigmoid_bias", "length_norm"},
    reference="sigmoid",
    ring_kernel="flash_sigmoid",
    writes_kv_cache=True,
)
def flash_sigmoid_attention(q, k, v, spec: AttentionSpec) -> torch.Tensor:
    """This repo's fused kernel: Triton on CUDA, the chunked O(T·block)-memory path on CPU.
    Padded batches run through its varlen path (no padding computed)."""
    kw = dict(dropout_p=spec.dropout_p, softmax_scale=spec.scale, causal=spec.causal, window_size=spec.window,
              alibi_slopes=spec.alibi_slopes, sigmoid_bias=0.0 if spec.sigmoid_bias is None else spec.sigmoid_bias,
              return_attn_mass=spec.probe is not None)  # fmt: skip
    if spec.kv_cache is not None:
        kw.pop("dropout_p")  # decoding: the module is in eval mode
        cache = spec.kv_cache
        result = flash_sigmoid.flash_attn_with_kvcache(q, cache.k, cache.v, k, v, cache_seqlens=cache.lengths, **kw)
    elif spec.k_padding is not None:
        result = _varlen(flash_sigmoid.flash_attn_varlen_func, q, k, v, spec, **kw)
    else:
        result = flash_sigmoid.flash_attn_func(q, k, v, **kw)
    if spec.probe is None:
        return result
    out, mass = result  # the kernel's per-row mass: what the diagnostics need, without the matrix
    spec.probe.record_mass(mass, spec.q_padding)
    return out
