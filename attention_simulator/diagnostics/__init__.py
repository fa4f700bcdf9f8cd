"""Norm diagnostics: probes in the models, the recorder, and end-of-run report figures."""

from ..probes import AttentionProbe, Probe, attention_stats, token_stats
from .collector import KINDS, Diagnostics, DiagnosticsConfig

__all__ = ["Diagnostics", "DiagnosticsConfig", "Probe", "AttentionProbe", "KINDS", "token_stats", "attention_stats"]
