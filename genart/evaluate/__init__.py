"""Evaluation of generative checkpoints: FID, KID and precision/recall on Inception or critic features.

    from genart.evaluate import score_checkpoint          # in-process, for training (rank 0)
    from genart.evaluate.job import run, summary          # the `genart evaluate` Ray Data job
Metric names (e.g. fid1k_critic) and how each is computed: genart.evaluate.registry.
"""

from genart.evaluate.features import DEFAULT_FEATURES, check_features, parse_features
from genart.evaluate.registry import METRICS, metric_keys
from genart.evaluate.scoring import score_checkpoint

__all__ = ["DEFAULT_FEATURES", "METRICS", "check_features", "metric_keys", "parse_features", "score_checkpoint"]
