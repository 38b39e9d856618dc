"""genart: train, batch-run and serve generative-art models on Ray."""

__version__ = "0.1.0"
