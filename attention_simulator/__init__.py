"""attention-simulator: sigmoid vs softmax attention on real training runs."""

__version__ = "0.1.0"
