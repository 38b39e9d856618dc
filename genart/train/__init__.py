"""Distributed training on Ray Train V2: config, the one generic train loop, run-folder outputs, the TorchTrainer."""
