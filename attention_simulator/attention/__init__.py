"""Attention: one module, pluggable backends (see `backends.BACKENDS`)."""

from .attention import Attention, AttentionConfig
from .backends import BACKENDS, AttentionSpec, register_backend

__all__ = ["Attention", "AttentionConfig", "AttentionSpec", "BACKENDS", "register_backend"]
