"""The attention options of a model (the `attention/` config group), checked against what the
chosen backend honours."""

from __future__ import annotations

from dataclasses import dataclass, fields

from ..errors import ConfigError
from .backends import BACKENDS, backends_supporting

CHOICES = {
    "position": ("none", "rope", "alibi"),
    "bias_n": ("max_length", "per_row"),
    "learnable_bias": (None, "scalar", "per_head"),
    "length_norm": (None, "n", "sqrt_n"),
    "temperature": (None, "scalar", "per_head"),
    "gate": ("none", "headwise", "elementwise"),
    "sink": ("none", "zero", "learned"),
}
WHY_NOT = {  # why an option has no meaning on the backends that refuse it
    "sink": "a sink takes its share of the mass through softmax's normaliser, which sigmoid attention does not have",
}


@dataclass(frozen=True)
class AttentionConfig:
    """Options of every attention layer in a model (the `attention/` config group).

    backend: softmax | sigmoid | flash_softmax | flash_sigmoid.
    num_kv_heads: key/value heads (a divisor of the model's heads: GQA; 1: MQA); null = all.
    position: none | rope | alibi (absolute embeddings are the model's `pos_embed`).
    rope_base, rope_fraction: RoPE's base and the fraction of each head's dims it rotates.
    window: sliding window: attend keys at most this far away (only behind, if causal).
    sigmoid_bias: auto (−log n), a number, or null; sigmoid backends only.
    bias_n: what n is for auto: max_length (the keys in the sequence, per sequence when padded;
        the paper's choice) or per_row (the keys each query actually attends: i + 1 when causal).
    learnable_bias: null | scalar | per_head: a learned offset added to sigmoid_bias (init 0).
    length_norm: null | n | sqrt_n: sigmoid attention output × 1/n or × 1/√n, n the keys the row attends.
    temperature: null | scalar | per_head: a learned log-scale on the logits (init 0: scale × 1).
    gate: none | headwise | elementwise: the attention output × σ(x W_g) before the output
        projection, x the layer's input: one gate per head and token, or one per channel.
    sink: none | zero | learned: one more logit per head in softmax's normaliser, with no value
        (zero: off-by-one softmax, 1 + Σ exp in the denominator; learned: a logit per head, init 0).
    qk_norm: null | layernorm | rmsnorm (true = layernorm): normalise queries and keys per head.
    qkv_bias: bias in the q/k/v projections. attn_drop, proj_drop: dropout on weights / output.
    """

    backend: str = "softmax"
    num_kv_heads: int | None = None
    position: str = "none"
    rope_base: float = 10000.0
    rope_fraction: float = 1.0
    window: int | None = None
    sigmoid_bias: float | str | None = None
    bias_n: str = "max_length"
    learnable_bias: str | None = None
    length_norm: str | None = None
    temperature: str | None = None
    gate: str = "none"
    sink: str = "none"
    qk_norm: str | bool | None = None
    qkv_bias: bool = True
    attn_drop: float = 0.0
    proj_drop: float = 0.0

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ConfigError(f"attention.backend={self.backend!r} is not a backend; choose one of {sorted(BACKENDS)}.")
        for field, allowed in CHOICES.items():
            if getattr(self, field) not in allowed:
                raise ConfigError(f"attention.{field}={getattr(self, field)!r}: choose one of {list(allowed)}.")
        if isinstance(self.sigmoid_bias, str) and self.sigmoid_bias != "auto":
            raise ConfigError(f"attention.sigmoid_bias={self.sigmoid_bias!r}: use 'auto' (−log n), a number, or null.")
        if self.bias_n == "per_row" and self.sigmoid_bias != "auto":
            raise ConfigError("attention.bias_n=per_row only applies to attention.sigmoid_bias=auto.")
        if self.window is not None and self.window < 0:
            raise ConfigError(f"attention.window={self.window} must be >= 0 (or null for no window).")
        if self.num_kv_heads is not None and self.num_kv_heads < 1:
            raise ConfigError(
                f"attention.num_kv_heads={self.num_kv_heads} must be >= 1 (a divisor of the heads), or null for one "
                "key/value head per query head."
            )
        for name in ("attn_drop", "proj_drop"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"attention.{name}={getattr(self, name)} must be in [0, 1).")
        if not 0.0 < self.rope_fraction <= 1.0:
            raise ConfigError(f"attention.rope_fraction={self.rope_fraction} must be in (0, 1].")
        requested = {
            "sigmoid_bias": self.sigmoid_bias is not None or self.learnable_bias is not None,
            "per_row_bias": self.bias_n == "per_row",
            "length_norm": self.length_norm is not None,
            "window": self.window is not None,
            "alibi": self.position == "alibi",
            "dropout": self.attn_drop > 0,
            "sink": self.sink != "none",
        }
        for option, on in requested.items():
            self.require(option, on)

    @property
    def bias_depends_on_length(self) -> bool:
        """True when b = −log(keys in the sequence): then every token's output depends on how
        long the whole sequence is, so keys cached from a shorter prefix go stale."""
        return self.sigmoid_bias == "auto" and self.bias_n == "max_length"

    def require(self, option: str, on: bool = True):
        """Raise unless the backend honours `option` (when it is switched on)."""
        if on and option not in BACKENDS[self.backend].supports:
            why = f" ({WHY_NOT[option]})" if option in WHY_NOT else ""
            raise ConfigError(
                f"attention.backend={self.backend!r} cannot honour {option}{why}; backends that can: "
                f"{backends_supporting(option)}. Switch the backend or turn the option off."
            )


@dataclass(frozen=True)
class SigmoidOptions:
    """The run config's `sigmoid:` section: the options only sigmoid backends read (their
    attention config takes them by interpolation). Kept apart from `attention:` so that one sweep
    over attention=softmax,sigmoid compares both on an experiment's sigmoid recipe."""

    bias: float | str | None = "auto"
    bias_n: str = "max_length"
    learnable_bias: str | None = None
    length_norm: str | None = None

    def changed(self) -> dict:
        """The options set away from their defaults."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) != f.default}
