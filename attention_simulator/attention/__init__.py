"""Attention: one module, pluggable backends (see `backends.BACKENDS`), positions and masks."""

from .attention import Attention, AttentionConfig, KVCache
from .backends import BACKENDS, AttentionSpec, register_backend
from .positions import RotaryEmbedding, alibi_slopes, sincos_1d, sincos_2d

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
]
