"""Evaluation of generative checkpoints: FID, KID and precision/recall on Inception or critic features.

    from genart.evaluate import score_checkpoint          # in-process, for training (rank 0)
    from genart.evaluate.job import run, summary          # the `genart evaluate` Ray Data job
"""

from genart.evaluate.features import DEFAULT_FEATURES, check_features, parse_features
from genart.evaluate.scoring import metric_keys, score_checkpoint

__all__ = ["DEFAULT_FEATURES", "check_features", "metric_keys", "parse_features", "score_checkpoint"]
