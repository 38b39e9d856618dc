"""Batch inference on Ray Data: `stylize`, `generate` and `score` jobs over folders, archives, Parquet and s3://."""

from genart.infer.jobs import RunOptions, generate, score, stylize

__all__ = ["RunOptions", "generate", "score", "stylize"]
