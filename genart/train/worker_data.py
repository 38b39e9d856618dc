"""What one training worker reads: its shard of the train split as endless augmented batches, and (rank 0) the
val split kept in memory. Used by genart.train.loop.train_loop_per_worker, step [3]."""

from __future__ import annotations

from typing import Iterator

import torch

from genart.train.augment import augment_batch
from genart.train.config import TrainConfig

# Validation / sample-grid batch: the critic's confusion-matrix PNG uses up to this many val images.
VAL_BATCH = 256


def train_batches(cfg: TrainConfig, device, augment: str, seed: int, cached: bool) -> Iterator[dict]:
    """This worker's shard of the train split as endless augmented (B, ...) batches, a new order every epoch.

    A cached split is read into this worker's memory once and permuted in full each epoch (an exact shuffle of
    its share, itself a uniform sample: the driver shuffled the split globally). A streamed split comes in a
    random block order through a shuffle buffer of data.shuffle_buffer_batches batches.
    """
    import ray.train

    shard = ray.train.get_dataset_shard("train")
    b = cfg.data.batch_size
    gen = torch.Generator().manual_seed(seed)
    if cached:
        # drop_last=False: this worker's whole share; streaming_split(equal=True) gives every worker as many rows
        parts = list(shard.iter_torch_batches(batch_size=1024, device="cpu"))
        if not parts:
            raise RuntimeError("this worker's share of the train split is empty")
        rows = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        n = len(rows["image"])
        if n < b:
            raise RuntimeError(f"this worker's share of the train split ({n} images) is smaller than data.batch_size={b}")
        while True:
            order = torch.randperm(n, generator=gen)
            for i in range(0, n - b + 1, b):  # drop the ragged last batch: equal steps per epoch on every worker
                idx = order[i : i + b]
                batch = {k: v[idx].to(device) for k, v in rows.items()}
                batch["image"] = augment_batch(batch["image"], augment, gen, cfg.data.crop_size)
                yield batch
    epoch = 0
    while True:
        got = 0
        # drop_last: every worker gets equally many full batches per epoch (streaming_split(equal=True))
        for batch in shard.iter_torch_batches(batch_size=b, drop_last=True, device=device,
                                              local_shuffle_buffer_size=cfg.data.shuffle_buffer_batches * b,
                                              local_shuffle_seed=seed + epoch):
            got += 1
            batch["image"] = augment_batch(batch["image"], augment, gen, cfg.data.crop_size)
            yield batch
        if not got:
            raise RuntimeError(f"epoch {epoch}: this worker's share of the train split is smaller than data.batch_size={b}")
        epoch += 1


class ValSplit:
    """The val split (capped on the driver), read once by rank 0 and kept in memory: every validation sees the
    same images, without restarting a Ray Data pipeline per checkpoint."""

    def __init__(self):
        import ray.train

        try:
            self.shard = ray.train.get_dataset_shard("val")
        except KeyError:  # the dataset has no val split
            self.shard = None
        self.cached: list[dict] | None = None

    def batches(self) -> list[dict]:
        if self.shard is None:
            return []
        if self.cached is None:
            self.cached = list(self.shard.iter_torch_batches(batch_size=VAL_BATCH, device="cpu"))
        return self.cached

    def example(self, label_names: list[str]) -> dict | None:
        """The first val batch (up to VAL_BATCH images) for the fixed sample grid; None without a val split."""
        batches = self.batches()
        return {**batches[0], "label_names": label_names} if batches else None
