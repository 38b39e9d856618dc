"""The stages of a batch-inference pipeline: decode (Ray tasks) -> model (an actor pool) -> encode + write (Ray tasks).

Rows travel between stages as Arrow tables (WORK_SCHEMA + job columns): decoded pixels as raw RGB uint8 bytes, or
the reason the row failed. A failure is caught per row and carried to the end as a status, never raised.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from genart import storage
from genart.data import images
from genart.errors import one_line
from genart.infer import naming, output

WORK_SCHEMA = pa.schema(
    [
        ("source", pa.string()),  # where the input came from (path, s3 URI, "archive!member", "file#row", "seed S index i")
        ("key", pa.string()),  # output path relative to the output root (or the row's key in a Parquet shard)
        ("error", pa.string()),  # why this row failed, else null
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("pixels", pa.binary()),  # raw RGB uint8, (height, width, 3) row-major; null on error
    ]
)
STATUS_SCHEMA = pa.schema([("source", pa.string()), ("key", pa.string()), ("error", pa.string())])


def decode_error(exc: BaseException) -> str:
    """The one-line reason an input is rejected: a validation Reject's own reason, or what decoding raised."""
    return exc.reason if isinstance(exc, images.Reject) else f"decode failed: {one_line(exc)}"


def get_cached(ref):
    """ray.get once per worker process (the done-set of a resumed run can be large)."""
    import ray

    cache = globals().setdefault("_REF_CACHE", {})
    key = ref.hex()
    if key not in cache:
        cache.clear()
        cache[key] = ray.get(ref)
    return cache[key]


# ---------------------------------------------------------------- decode (tasks)


def decode_batch(batch: pa.Table, ext: str | None, renames: dict, skip_ref, max_pixels: int | None,
                 max_side: int | None) -> pa.Table:
    """Raw records (sources.RAW_SCHEMA) -> WORK_SCHEMA rows: validated, decoded, capped pixels or an error."""
    from genart.infer.naming import output_key

    skip = get_cached(skip_ref) if skip_ref is not None else ()
    rows = []
    for rec in batch.to_pylist():
        key = renames.get(rec["source"]) or output_key(rec["rel_path"], ext)
        if key in skip:  # already written by the run being resumed (Parquet inputs are filtered here)
            continue
        row = {"source": rec["source"], "key": key, "error": rec["error"], "width": None, "height": None, "pixels": None}
        if not row["error"]:
            try:
                img = images.cap_side(images.decode_image(rec["data"], max_pixels), max_side)
                row.update(width=img.width, height=img.height, pixels=img.tobytes())
            except Exception as exc:  # noqa: BLE001 - one odd image must never stop the job
                row["error"] = decode_error(exc)
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=WORK_SCHEMA)


def to_tensor(row_pixels: bytes, width: int, height: int):
    """Raw RGB bytes -> torch float32 (3, H, W) in [0, 1]."""
    import torch

    arr = np.frombuffer(row_pixels, dtype=np.uint8).reshape(height, width, 3)
    return torch.from_numpy(arr.transpose(2, 0, 1).astype(np.float32) / 255.0)


def to_pixels(x) -> bytes:
    """torch (3, H, W) in [0, 1] -> raw RGB uint8 bytes (rounded as `images.from_tensor01` does)."""
    arr = (np.clip(x.detach().cpu().numpy(), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return arr.transpose(1, 2, 0).tobytes()


# ---------------------------------------------------------------- model actors


class ModelActor:
    """Loads the model once per actor (on its GPU if it has one), with a fixed number of torch threads.

    Every forward pass runs inside `self.inference()`; device, precision, memory format and cuDNN flags come from
    `models.family.InferenceSetup` (shared with the Serve replicas): on a GPU channels-last weights and, unless
    `autocast=False`, bf16/fp16 autocast; fp32 on CPUs unless `autocast=True`. `deterministic` asks for outputs
    that do not depend on what else is in a batch (see InferenceSetup).
    """

    family: str | tuple[str, ...] = ""  # what models.load accepts (a name, names or models.GENERATIVE)

    def __init__(self, checkpoint: str, threads: int = 1, use_gpu: bool = False, deterministic: bool = False,
                 autocast: bool | None = None, **options):
        import torch

        from genart import models
        from genart.models.family import InferenceSetup

        torch.set_num_threads(max(1, int(threads)))
        self.placement = InferenceSetup(use_gpu, deterministic, autocast)
        self.device = self.placement.device
        model = models.load(checkpoint, family=self.family or None, command=type(self).__name__)
        self.model = self.placement.place(model)
        self.options = options
        self.setup()

    def setup(self) -> None:
        pass

    def inference(self):
        """The context every forward pass runs in (InferenceSetup.inference)."""
        return self.placement.inference()

    def to_device(self, x):
        """(N, C, H, W) CPU tensor -> on the actor's device, in the weights' memory format."""
        return self.placement.to_device(x)


TILE_BATCH = 4  # tiles per forward pass: fixed, so the output never depends on run options like --batch-size


class StylizeActor(ModelActor):
    """WORK rows -> WORK rows with stylised pixels: images of one size (after --max-side) stacked into forward
    passes (the whole group on a GPU, `models.family.images_per_pass` on a CPU); images larger than the tile go alone,
    their tiles TILE_BATCH per pass.

    A batch that fails (e.g. out of memory) is retried one image at a time, so only the image that cannot be
    stylised is reported. With `deterministic`, each output is bit-identical to stylising its image alone.
    """

    family = "style"

    def setup(self) -> None:
        from genart.infer import tiling

        self.layers = tiling.norm_layers(self.model.nets)
        self.tile = self.options.get("tile")
        self.overlap = self.options.get("overlap")
        # Tiles keep TILE_BATCH per pass on a CPU too: the norm-statistics pass sees the image shrunk to that many
        # tiles' area, so fewer tiles per pass would mean coarser statistics and visible seams.
        self.tile_batch = TILE_BATCH

    def _overlap(self) -> int:
        if self.overlap is None:  # measured on first use: only jobs with images larger than a tile pay for it
            from genart.infer import tiling

            with self.inference():
                radius = tiling.receptive_radius(self._forward, self.layers, self.device, probe=192)
            self.overlap = tiling.default_overlap(self.tile, radius)
        return self.overlap

    def _forward(self, x):
        """(N, 3, H, W) in [0, 1] -> (N, 3, H, W) float32 in [0, 1], on the CPU."""
        return self.model.stylize(self.to_device(x)).float().cpu()

    def stylize_many(self, xs: list):
        """Same-size (3, H, W) tensors in [0, 1] -> (N, 3, H, W) in [0, 1]; stacked forward passes unless tiled."""
        import torch

        from genart.infer import tiling
        from genart.models.family import in_passes

        with self.inference():
            if not self.tile or max(xs[0].shape[1:]) <= self.tile:
                return in_passes(self._forward, torch.stack(xs), self.device)
            return torch.stack([tiling.tiled(self._forward, x, self.tile, self._overlap(), self.tile_batch, self.layers)
                                for x in xs])

    def stylize(self, x):
        """(3, H, W) in [0, 1] -> (3, H, W) in [0, 1], tiled when larger than the tile."""
        return self.stylize_many([x])[0]

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        by_size: dict[tuple[int, int], list[dict]] = {}
        for row in rows:
            if not row["error"]:
                by_size.setdefault((row["height"], row["width"]), []).append(row)
        for group in by_size.values():
            try:
                self._stylize_rows(group)
                continue
            except Exception as exc:  # noqa: BLE001 - e.g. out of memory on one huge image: report it, go on
                if len(group) == 1:
                    group[0].update(error=f"stylize failed: {one_line(exc)}", pixels=None)
                    continue
            for row in group:  # the batch failed: one by one, so only the culprit gets an error
                try:
                    self._stylize_rows([row])
                except Exception as exc:  # noqa: BLE001
                    row.update(error=f"stylize failed: {one_line(exc)}", pixels=None)
        return pa.Table.from_pylist(rows, schema=batch.schema)

    def _stylize_rows(self, group: list[dict]) -> None:
        height, width = group[0]["height"], group[0]["width"]
        out = self.stylize_many([to_tensor(r["pixels"], width, height) for r in group])
        if tuple(out.shape[1:]) != (3, height, width):
            raise RuntimeError(f"model returned shape {tuple(out.shape[1:])}")
        pixels = [to_pixels(o) for o in out]  # all converted before any row is changed: a retry starts clean
        for row, p in zip(group, pixels):
            row["pixels"] = p


GENERATE_CHUNK = 16  # images per forward pass in `generate`, aligned to index multiples (see GenerateActor)

GENERATED_SCHEMA = WORK_SCHEMA.append(pa.field("seed", pa.int64())).append(pa.field("index", pa.int64())) \
    .append(pa.field("latent_seed", pa.int64())).append(pa.field("label", pa.int32()))


def latent_seed(seed: int, index: int) -> int:
    """The latent seed of image `index` of a run with `seed`: distinct for every (seed, index), reproducible in serving
    as `model.sample([latent_seed])`."""
    return (int(seed) << 32) | int(index)


class GenerateActor(ModelActor):
    """Indices ("id") -> generated images. Forward passes cover fixed index chunks [16k, 16k+16), whatever the
    batch: image i always comes out of the same computation, so the bytes depend only on (seed, index)."""

    family = "generative"  # models.GENERATIVE: any family the registry marks generative

    def labels_for(self, seeds: list[int]) -> list[int] | None:
        from genart.models.sampling import seed_labels

        if not getattr(self.model, "conditional", False):
            return None
        return seed_labels(seeds, self.options.get("label"), self.model.num_labels)

    def __call__(self, batch: pa.Table) -> pa.Table:
        seed, num, ext = self.options["seed"], self.options["num"], self.options["ext"]
        wanted = sorted(batch.column("id").to_pylist())
        rows = []
        for chunk in sorted({i // GENERATE_CHUNK for i in wanted}):
            indices = list(range(chunk * GENERATE_CHUNK, min(num, (chunk + 1) * GENERATE_CHUNK)))
            seeds = [latent_seed(seed, i) for i in indices]
            labels = self.labels_for(seeds)
            with self.inference():
                out = self.model.sample(seeds, labels=labels, truncation=self.options["truncation"],
                                        guidance=self.options.get("guidance")).float().cpu()
            keep = set(wanted)
            for j, i in enumerate(indices):
                if i not in keep:
                    continue
                rows.append({
                    "source": f"seed {seed} index {i}", "key": naming.image_name(seed, i, num, ext), "error": None,
                    "width": out.shape[-1], "height": out.shape[-2], "pixels": to_pixels(out[j]),
                    "seed": seed, "index": i, "latent_seed": seeds[j], "label": None if labels is None else labels[j],
                })
        return pa.Table.from_pylist(rows, schema=GENERATED_SCHEMA)


SCORE_SCHEMA = pa.schema(
    [
        ("source", pa.string()),
        ("key", pa.string()),
        ("error", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("label", pa.int32()),  # predicted class (argmax of probs)
        ("label_name", pa.string()),
        ("probs", pa.list_(pa.float32())),  # (K,) in the model's label_names order
        ("embedding", pa.list_(pa.float32())),  # (D,) penultimate features
    ]
)


class ScoreActor(ModelActor):
    """WORK rows -> SCORE rows: each image center-cropped and resized to the critic's size (`images.model_input`, as
    serving does), then batched passes (`models.family.in_passes`)."""

    family = "critic"

    def __call__(self, batch: pa.Table) -> pa.Table:
        import torch

        from genart.data.images import model_input
        from genart.models.family import in_passes

        rows, ready, tensors = [], [], []
        for row in batch.to_pylist():
            out = {k: row[k] for k in ("source", "key", "error", "width", "height")}
            rows.append(out)
            if out["error"]:
                continue
            try:
                pixels = np.frombuffer(row["pixels"], dtype=np.uint8).reshape(row["height"], row["width"], 3)
                # the same crop + resize as serving and training data: a batch score equals the served score
                tensors.append(torch.from_numpy(model_input(pixels, self.model.image_size))[None])
                ready.append(out)
            except Exception as exc:  # noqa: BLE001
                out["error"] = f"score failed: {one_line(exc)}"
        if tensors:
            with self.inference():
                x = self.to_device(torch.cat(tensors))
                probs, emb = (t.cpu().numpy() for t in in_passes(self.model.predict_and_embed, x, self.device))
            names = self.model.label_names
            for out, p, e in zip(ready, probs, emb):
                label = int(p.argmax())
                out.update(label=label, label_name=names[label] if label < len(names) else None,
                           probs=p.astype(np.float32).tolist(), embedding=e.astype(np.float32).tolist())
        return pa.Table.from_pylist(rows, schema=SCORE_SCHEMA)


# ---------------------------------------------------------------- encode + write (tasks)


def write_batch(batch: pa.Table, out: str, fmt: str) -> pa.Table:
    """Encode and write every good row (one file each, or one Parquet shard for the batch); return the statuses."""
    errors = batch.column("error").to_pylist()
    keys = batch.column("key").to_pylist()
    if fmt == "parquet":
        good = [i for i, e in enumerate(errors) if e is None]
        table = batch.take(good)
        if "pixels" in table.column_names:
            encoded = [images.encode_png(_image(p, w, h)) for p, w, h in zip(
                table.column("pixels").to_pylist(), table.column("width").to_pylist(), table.column("height").to_pylist())]
            table = table.drop_columns(["pixels"]).append_column("image", pa.array(encoded, pa.binary()))
        table = table.drop_columns(["error"])
        if table.num_rows:
            try:
                output.write_shard(out, table)
            except Exception as exc:  # noqa: BLE001 - the rows stay missing; --resume retries them
                for i in good:
                    errors[i] = f"write failed: {one_line(exc)}"
    else:
        pixels, widths, heights = (batch.column(c).to_pylist() for c in ("pixels", "width", "height"))
        for i, key in enumerate(keys):
            if errors[i] is not None:
                continue
            try:
                data = images.encode(_image(pixels[i], widths[i], heights[i]), fmt)
                storage.write_bytes(storage.join(out, key), data)
            except Exception as exc:  # noqa: BLE001
                errors[i] = f"write failed: {one_line(exc)}"
    status = pa.table({"source": batch.column("source"), "key": keys, "error": errors}, schema=STATUS_SCHEMA)
    return status


def _image(pixels: bytes, width: int, height: int):
    from PIL import Image

    return Image.frombytes("RGB", (width, height), pixels)
