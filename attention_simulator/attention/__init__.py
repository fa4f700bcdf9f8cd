"""Attention: one module, pluggable backends (see `backends.BACKENDS`), positions, masks, and ring
attention for context parallelism (`ring`)."""

from . import ring
from .attention import Attention
from .backends import BACKENDS, AttentionSpec, register_backend
from .config import AttentionConfig
from .kvcache import KVCache
from .positions import RotaryEmbedding, alibi_slopes, sincos_1d, sincos_2d
from .ring import ContextParallel, ring_attention

__all__ = [
    "Attention",
    "AttentionConfig",
    "KVCache",
    "AttentionSpec",
    "BACKENDS",
    "register_backend",
    "RotaryEmbedding",
    "alibi_slopes",
    "sincos_1d",
    "sincos_2d",
    "ring",
    "ContextParallel",
    "ring_attention",
]
