"""The class each generated image is drawn as: the evaluated real split's label shares, as stylegan2-ada draws c
from the dataset's labels, so that a conditional generator is compared with real images of the same class mix.

    policy = label_policy(model, "data/prepared", "all")
    model.sample(seeds, labels=policy.labels(seeds))      # None for an unconditional model
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from genart import storage
from genart.data.read import parquet_files, read_manifest

LABEL_STREAM = 0x6C61626C  # "labl": a seed's label draw, apart from its latent (SeedSequence([seed]))


@dataclass(frozen=True)
class LabelPolicy:
    rule: str  # "dataset": each seed draws from `shares` | "seed": the model's default, seed % C | "none": unconditional
    names: tuple[str, ...] = ()  # the model's classes
    shares: tuple[float, ...] = ()  # per class in `names`, summing to 1 ("dataset" only)
    source: str = ""  # where the class counts came from
    note: str = ""

    def labels(self, seeds: list[int]) -> list[int] | None:
        """One class index per seed, a pure function of (seed, shares); None lets the model use its own default."""
        if self.rule != "dataset":
            return None
        p = np.asarray(self.shares)
        return [int(np.random.default_rng(np.random.SeedSequence([int(s), LABEL_STREAM])).choice(len(p), p=p))
                for s in seeds]

    def describe(self) -> dict:
        out = {"rule": self.rule}
        if self.rule == "dataset":
            out.update(shares={n: round(s, 4) for n, s in zip(self.names, self.shares)}, source=self.source)
        if self.note:
            out["note"] = self.note
        return out


def split_label_counts(uri: str, split: str) -> tuple[dict[str, int], str]:
    """Labelled images per class name in a prepared dataset's split ("all": both): from manifest.json's
    label_counts, or for a manifest written before it, counted from the shards' label column (one small column)."""
    manifest = read_manifest(uri)
    wanted = ("train", "val") if split == "all" else (split,)
    if "label_counts" in manifest:
        counts = {name: sum(int(n.get(s, 0)) for s in wanted) for name, n in manifest["label_counts"].items()}
        return counts, "manifest.json label_counts"
    names = {int(i): name for name, i in (manifest.get("labels") or {}).items()}
    counts: Counter = Counter()
    fs, _ = storage.arrow_fs(uri)
    for shard in parquet_files(uri):
        table = pq.read_table(storage.arrow_fs(shard)[1], filesystem=fs, columns=["label", "split"])
        if split != "all":
            table = table.filter(pc.equal(table.column("split"), split))
        counts.update(i for i in table.column("label").to_pylist() if i is not None)
    return {names.get(i, str(i)): n for i, n in counts.items()}, "counted from the shards' label column"


def label_policy(model, uri: str, split: str) -> LabelPolicy:
    """How `model` (a generative Loaded; `.conditional` is genart.models.takes_labels of its config) picks each
    seed's class when scored against `split` of the dataset at `uri`."""
    if not getattr(model, "conditional", False):
        return LabelPolicy("none")
    names = tuple(model.label_names)
    counts, source = split_label_counts(uri, split)
    known = [counts.get(name, 0) for name in names]
    if sum(known) == 0:
        return LabelPolicy("seed", names, note=f"no labelled images of the model's classes in the {split} split "
                                               f"({source}): class seed % {len(names)}, equal shares")
    unknown = sorted(name for name, n in counts.items() if n and name not in names)
    note = f"real images of classes the model lacks, never generated: {', '.join(unknown)}" if unknown else ""
    return LabelPolicy("dataset", names, tuple(n / sum(known) for n in known), f"{split} split, {source}", note)
