"""Metric sinks (W&B, parquet, console) behind one `Tracker`."""

from .sinks import ConsoleSink, ParquetSink, Tracker, WandbSink, build_tracker, final_values

__all__ = ["Tracker", "build_tracker", "ParquetSink", "ConsoleSink", "WandbSink", "final_values"]
