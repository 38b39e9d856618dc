"""`genart prepare`: raw images (folders, archives, Parquet, s3://) -> validated, deduplicated, sharded Parquet.

    genart prepare data/raw.zip --out data/prepared --size 64

Stages: plan on the driver -> read + decode + validate + resize as a Ray Data pipeline -> staging shards ->
finalize (drop exact duplicates, find near duplicates by perceptual hash and report or drop them, name shards
part-*.parquet, write rejected.jsonl, duplicates.jsonl, near_duplicates.jsonl) -> manifest.json last.
DEST is complete or absent: until the manifest exists, nothing at DEST looks like a finished dataset.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime as dt
import hashlib
import json
import posixpath
import re
import time
import uuid
from dataclasses import dataclass
from typing import Annotated, Literal

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from genart import __version__, storage
from genart.config import Options, Rule
from genart.data import images, near_dupes, sources
from genart.errors import UserError, one_line

FORMAT_VERSION = 1
SCHEMA = pa.schema(
    [
        ("id", pa.string()),  # first 16 hex chars of sha256: stable, derived from the pixels
        ("image", pa.binary()),  # lossless PNG of the normalised RGB image
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("label", pa.int32()),  # index into manifest["labels"], null when unlabelled
        ("label_name", pa.string()),
        ("split", pa.string()),  # "train" | "val", deterministic from id
        ("source", pa.string()),  # original path, s3 URI, "archive!member" or "file#row"
        ("sha256", pa.string()),  # of the decoded pixels and size: equal for the same picture in any encoding
        ("phash", pa.string()),  # perceptual hash of the decoded picture (near_dupes): close for near copies
    ]
)


MAX_NEAR_THRESHOLD = 96  # a third of the hash's bits: beyond that, unrelated pictures start to pair up


class PrepareOptions(Options):
    """How `genart prepare` runs; a value outside its rule is a one-line UserError when the options are built."""

    # square side in px; None keeps the normalised original size
    size: Annotated[int | None, Field(ge=8, le=4096), Rule("--size {value}: must be between 8 and 4096")] = None
    # "crop" (center) or "pad" (white borders)
    resize_mode: Annotated[Literal["crop", "pad"], Rule("--resize {value}: must be crop or pad")] = "crop"
    # "dirs" | "none" | None (dirs when SRC has subfolders)
    labels: Annotated[Literal["dirs", "none"] | None, Rule("--labels {value}: must be dirs or none")] = None
    val_fraction: Annotated[float, Field(ge=0.0, lt=1.0), Rule("--val-fraction {value}: must be in [0, 1)")] = 0.05
    shard_rows: Annotated[int, Field(ge=1), Rule("--shard-rows {value}: must be at least 1")] = 10_000
    max_pixels: Annotated[int, Field(ge=1), Rule("--max-pixels {value}: must be at least 1")] = images.DEFAULT_MAX_PIXELS
    overwrite: bool = False
    near_dedup: bool = False  # drop near duplicates; False reports them in near_duplicates.jsonl and keeps them
    near_threshold: Annotated[  # largest Hamming distance of perceptual hashes that makes a near-duplicate pair
        int, Field(ge=0, le=MAX_NEAR_THRESHOLD), Rule(f"--near-threshold {{value}}: must be between 0 and {MAX_NEAR_THRESHOLD}")
    ] = near_dupes.DEFAULT_THRESHOLD


def split_of(image_id: str, val_fraction: float) -> str:
    """Deterministic split from the id: the same image is in the same split on every run."""
    return "val" if int(image_id[:8], 16) / 0x1_0000_0000 < val_fraction else "train"


def _hashed(key: str) -> str:
    return hashlib.sha1(key.encode()).hexdigest()


def mixed(plan: sources.Plan) -> sources.Plan:
    """The plan with its inputs in a hashed (deterministic, class-blind) order, so shards come out mixed.

    Inputs are usually listed class by class (sorted folders); written in that order, every shard, the first rows
    of a split and every streamed block would hold one class. Plain files and zip members are re-chunked in the
    order of their hashed names; a tar stream or a Parquet file stays one unit (its rows keep their order) and
    only takes a hashed place among the units. Costs nothing at run time: no image bytes are shuffled.
    The names hashed are relative to their source (and an archive's own name, not its folder): the same images
    prepared in another folder come out in the same order, so a seeded run on them trains the same model.
    """
    plain, zips, whole = {}, {}, []
    for unit in plan.units:
        if unit.kind == "files":  # local files and s3:// objects in units of their own: a unit reads one store
            plain.setdefault(storage.is_s3(unit.items[0]), []).extend(zip(unit.items, unit.rel_paths, unit.labels))
        elif unit.kind == "zip":
            zips.setdefault(unit.uri, []).extend(zip(unit.items, unit.rel_paths, unit.labels))
        else:
            whole.append(unit)
    units = list(whole)
    for kind, uri, members in [("files", "", m) for m in plain.values()] + [("zip", u, m) for u, m in zips.items()]:
        members = sorted(members, key=lambda m: _hashed(f"{posixpath.basename(uri)}!{m[1]}"))
        for i in range(0, len(members), sources.FILES_PER_UNIT):
            chunk = members[i : i + sources.FILES_PER_UNIT]
            units.append(sources.Unit(kind, uri, [c[0] for c in chunk], [c[1] for c in chunk], [c[2] for c in chunk]))
    units.sort(key=lambda u: _hashed(f"{u.kind}:{posixpath.basename(u.uri)}:{(u.rel_paths or [''])[0]}"))
    return dataclasses.replace(plan, units=units)


def _ours(name: str) -> bool:
    """Files genart writes at DEST; nothing else there is ever deleted, even with --overwrite."""
    # _genart_cache: evaluation's reference statistics, keyed by dataset hash, so stale ones are harmless to drop.
    # palette-K.json: `genart palette`'s colours of the old dataset, stale once it is replaced.
    return (name.startswith(("part-", "_staging-")) or name in sources.DATASET_SIDECARS or name == "_genart_cache"
            or re.fullmatch(r"palette-\d+\.json", name) is not None)


def _check_dest(dest: str, overwrite: bool) -> None:
    if storage.exists(storage.join(dest, "manifest.json")) and not overwrite:
        raise UserError(f"{dest} already holds a dataset; pass --overwrite to replace it")
    foreign = [storage.relative(dest, u) for u in storage.listdir(dest) if not _ours(storage.relative(dest, u))]
    if foreign:
        raise UserError(f"{dest} holds files that are not part of a genart dataset (e.g. {foreign[0]}); choose an empty --out")
    storage.check_writable(dest)


def prepare(srcs: list[str], dest: str, opts: PrepareOptions, progress: bool = True) -> dict:
    """Run the whole pipeline; returns the manifest. Raises UserError before writing anything on bad input."""
    import ray

    from genart import runtime

    if not srcs:
        raise UserError("no SRC given")
    for src in srcs:  # a rerun would read the earlier dataset's shards as inputs: every picture twice
        if storage.within(dest, src):
            raise UserError(f"--out {dest} is inside SRC {src}: a rerun would read its own output; choose another --out")
    plan = mixed(sources.plan(srcs, opts.labels))
    sources.input_names(plan)  # two inputs of one name (raw files beside a dataset made of them): refused now
    _check_dest(dest, opts.overwrite)
    runtime.init()
    ray.data.DataContext.get_current().enable_progress_bars = progress

    started = time.time()
    run_id = uuid.uuid4().hex[:8]
    staging = storage.join(dest, f"_staging-{run_id}")
    label_index = {name: i for i, name in enumerate(plan.label_names)}
    reject_dir = storage.join(staging, "rejects")
    size, mode, max_pixels, val_fraction = opts.size, opts.resize_mode, opts.max_pixels, opts.val_fraction

    def to_row(rec: dict) -> dict:
        img = images.decode_image(rec["data"], max_pixels)
        digest = images.pixel_sha256(img)
        phash = near_dupes.perceptual_hash(img)  # of the picture as given, before --size crops it
        if size:
            img = images.resize_square(img, size, mode)
        image_id = digest[:16]
        label_name = rec["label_name"]
        return {
            "id": image_id,
            "image": images.encode_png(img),
            "width": img.width,
            "height": img.height,
            "label": label_index.get(label_name) if label_name else None,
            "label_name": label_name,
            "split": split_of(image_id, val_fraction),
            "source": rec["source"],
            "sha256": digest,
            "phash": phash,
        }

    def process(batch: pa.Table) -> pa.Table:
        """Raw records -> dataset rows; rejects go to a side file so the good rows stream on to the writer."""
        rows, rejects = [], []
        for rec in batch.to_pylist():
            if rec["error"]:
                rejects.append({"source": rec["source"], "reason": rec["error"]})
                continue
            try:
                rows.append(to_row(rec))
            except images.Reject as rej:
                rejects.append({"source": rec["source"], "reason": rej.reason})
            except Exception as exc:  # noqa: BLE001 - one odd image must never stop a million-image job
                rejects.append({"source": rec["source"], "reason": f"processing failed: {one_line(exc)}"})
        if rejects:
            # Named by content, so a retried task overwrites its own file instead of duplicating rejects.
            body = "".join(json.dumps(r) + "\n" for r in rejects).encode()
            storage.write_bytes(storage.join(reject_dir, hashlib.sha1(body).hexdigest() + ".jsonl"), body)
        return pa.Table.from_pylist(rows, schema=SCHEMA)

    raw, _ = sources.read_images(srcs, max_bytes=images.file_byte_cap(opts.max_pixels), the_plan=plan)
    fs, staging_path = storage.arrow_fs(storage.join(staging, "parts"))
    ds = raw.map_batches(process, batch_size=32, batch_format="pyarrow")
    ds.write_parquet(staging_path, filesystem=fs, min_rows_per_file=opts.shard_rows, max_rows_per_file=opts.shard_rows)

    manifest = _finalize(dest, staging, plan, opts, started)
    storage.remove(staging)
    return manifest


@dataclass(frozen=True)
class StagedRow:
    """What finalize needs of one staged row: small, no image bytes."""

    id: str
    source: str  # unique per input: the row's identity through finalize
    sha256: str
    phash: str
    split: str
    label: int | None  # index into the labels, None when unlabelled
    shard: int  # index of its staging shard


@dataclass(frozen=True)
class Fates:
    """What finalize decided for every staged row and failed input (each input is in exactly one of these)."""

    kept: list[StagedRow]  # written to part-*.parquet
    duplicates: list[dict]  # duplicates.jsonl: exact copies of a kept picture
    near: list[dict]  # near_duplicates.jsonl: every near pair found, dropped or not
    dropped: set[str]  # sources of near duplicates left out (--near-dedup)
    rejects: dict[str, dict]  # rejected.jsonl by source: undecodable, too small, unreadable
    resplit: dict[str, str] = dataclasses.field(default_factory=dict)  # kept near copies moved to their original's split

    def counts(self, num_inputs: int) -> dict:
        return {"input": num_inputs, "written": len(self.kept), "rejected": len(self.rejects),
                "duplicates": len(self.duplicates), "near_duplicates": len(self.near),
                "near_duplicates_dropped": len(self.dropped)}


def _finalize(dest: str, staging: str, plan: sources.Plan, opts: PrepareOptions, started: float) -> dict:
    """Deduplicate, rename shards to part-*.parquet, write the sidecar files, then the manifest (last)."""
    fs, _ = storage.arrow_fs(dest)
    parts = sorted(u for u in storage.listdir(storage.join(staging, "parts")) if u.endswith(".parquet"))
    rows = _staged_rows(parts, fs)
    fates = _decide(rows, staging, plan, opts)
    _check_accounted(fates, plan.num_inputs)
    _clear_old_dataset(dest, staging)  # only now that the new one is complete in staging
    dirty = ({r.shard for r in rows} - _whole_shards(rows, fates.kept)) | {r.shard for r in fates.kept if r.source in fates.resplit}
    _publish_shards(parts, {r.source for r in fates.kept}, fates.resplit, dirty, dest, fs)
    _write_jsonl(storage.join(dest, "rejected.jsonl"), [r for _, r in sorted(fates.rejects.items())])
    _write_jsonl(storage.join(dest, "duplicates.jsonl"), sorted(fates.duplicates, key=lambda r: r["source"]))
    _write_jsonl(storage.join(dest, "near_duplicates.jsonl"), fates.near)
    manifest = _manifest(fates, plan, opts, num_shards=len(parts), started=started)
    storage.write_text(storage.join(dest, "manifest.json"), json.dumps(manifest, indent=2) + "\n")
    return manifest


def _decide(rows: list[StagedRow], staging: str, plan: sources.Plan, opts: PrepareOptions) -> Fates:
    """Exact duplicates, then near duplicates among the unique pictures, then the rejects of every stage."""
    unique, duplicates = _exact_duplicates(rows)
    near = _near_duplicates(unique, opts.near_threshold)
    dropped = {pair["duplicate_source"] for pair in near} if opts.near_dedup else set()
    kept = [r for r in unique if r.source not in dropped]
    # A near copy kept in the other split than its original (each picture's split hashes its own pixels) would put
    # a train picture's twin in val: it joins its original's split (as exact copies are kept once).
    split = {r.source: r.split for r in unique}
    resplit = {pair["duplicate_source"]: split[pair["kept_source"]] for pair in near
               if pair["duplicate_source"] not in dropped and split[pair["duplicate_source"]] != split[pair["kept_source"]]}
    kept = [dataclasses.replace(r, split=resplit[r.source]) if r.source in resplit else r for r in kept]
    return Fates(kept, duplicates, near, dropped, _rejects(staging, plan), resplit)


def _check_accounted(fates: Fates, num_inputs: int) -> None:
    # Never a silent drop: an input neither written, rejected nor deduplicated is a bug worth stopping for.
    accounted = len(fates.kept) + len(fates.rejects) + len(fates.duplicates) + len(fates.dropped)
    if accounted != num_inputs:
        raise RuntimeError(f"prepare lost track of inputs: {num_inputs} planned, {accounted} accounted for")


def _manifest(fates: Fates, plan: sources.Plan, opts: PrepareOptions, num_shards: int, started: float) -> dict:
    splits = collections.Counter(r.split for r in fates.kept)
    splits_of = collections.defaultdict(collections.Counter)
    for r in fates.kept:
        if r.label is not None:
            splits_of[r.label][r.split] += 1
    return {
        "version": FORMAT_VERSION,
        "counts": fates.counts(plan.num_inputs),
        "labels": {name: i for i, name in enumerate(plan.label_names)},
        "splits": {"train": splits.get("train", 0), "val": splits.get("val", 0)},
        # images outside the class folders of a labelled dataset (label null): models that need labels refuse them
        "unlabelled": sum(1 for r in fates.kept if r.label is None) if plan.label_names else 0,
        # images per label and split: a class whose every file was rejected stays in the labels (ids are positional)
        "label_counts": {name: {"train": splits_of[i].get("train", 0), "val": splits_of[i].get("val", 0)}
                         for i, name in enumerate(plan.label_names)},
        "image_size": opts.size,
        "resize_mode": opts.resize_mode if opts.size else None,
        "val_fraction": opts.val_fraction,
        "max_pixels": opts.max_pixels,
        "near_dedup": {"threshold": opts.near_threshold, "drop": opts.near_dedup, "hash_bits": near_dupes.HASH_BITS},
        "shards": num_shards,
        "reject_reasons": dict(collections.Counter(_reason_kind(r["reason"]) for r in fates.rejects.values())),
        "sources": [str(s) for s in plan_sources_of(plan)],
        "seconds": round(time.time() - started, 2),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "genart_version": __version__,
    }


def _staged_rows(parts: list[str], fs) -> list[StagedRow]:
    rows = []
    columns = ["id", "source", "sha256", "phash", "split", "label"]
    for index, part in enumerate(parts):
        table = pq.read_table(storage.arrow_fs(part)[1], filesystem=fs, columns=columns)
        rows.extend(StagedRow(*values, shard=index)
                    for values in zip(*(table.column(c).to_pylist() for c in columns)))
    return rows


def _exact_duplicates(rows: list[StagedRow]) -> tuple[list[StagedRow], list[dict]]:
    """(one row per picture, sorted by source; the others as duplicates.jsonl records).

    The copy kept is the one with the smallest source name: deterministic across runs.
    """
    keep: dict[str, str] = {}
    for row in rows:
        if row.sha256 not in keep or row.source < keep[row.sha256]:
            keep[row.sha256] = row.source
    unique = sorted((r for r in rows if keep[r.sha256] == r.source), key=lambda r: r.source)
    duplicates = [{"source": r.source, "duplicate_of": keep[r.sha256]} for r in rows if keep[r.sha256] != r.source]
    return unique, duplicates


def _near_duplicates(unique: list[StagedRow], threshold: int) -> list[dict]:
    """near_duplicates.jsonl records, in source order: the earlier picture by source name is the one kept."""
    pairs = near_dupes.find([r.phash for r in unique], threshold)
    return [{"kept_id": unique[p.kept].id, "kept_source": unique[p.kept].source, "duplicate_id": unique[p.duplicate].id,
             "duplicate_source": unique[p.duplicate].source, "distance": p.distance} for p in pairs]


def _whole_shards(rows: list[StagedRow], kept: list[StagedRow]) -> set[int]:
    """Shards every row of which is kept: moved as they are, never rewritten."""
    staged, survived = collections.Counter(r.shard for r in rows), collections.Counter(r.shard for r in kept)
    return {shard for shard, n in staged.items() if survived[shard] == n}


def _rejects(staging: str, plan: sources.Plan) -> dict[str, dict]:
    rejects = {}
    for uri in storage.listdir(storage.join(staging, "rejects")):
        for line in storage.read_text(uri).splitlines():
            rec = json.loads(line)
            rejects[rec["source"]] = rec
    rejects.update({f["source"]: f for f in plan.failures})
    return rejects


def _clear_old_dataset(dest: str, staging: str) -> None:
    """Remove an older dataset at DEST (manifest first), and staging folders of crashed runs; never this staging."""
    storage.remove(storage.join(dest, "manifest.json"))
    for old in storage.listdir(dest):
        name = storage.relative(dest, old)
        if _ours(name) and name != staging.rstrip("/").rsplit("/", 1)[-1]:
            storage.remove(old)


def _publish_shards(parts: list[str], kept_sources: set[str], resplit: dict[str, str], dirty: set[int], dest: str,
                    fs) -> None:
    """Staging shards -> part-NNNNN.parquet: moved when whole, rewritten when dirty (without their dropped rows, and
    with the `resplit` rows in their new split)."""
    for index, part in enumerate(parts):
        target = storage.join(dest, f"part-{index:05d}.parquet")
        if index in dirty:
            table = pq.read_table(storage.arrow_fs(part)[1], filesystem=fs)
            table = table.filter(pa.array([s in kept_sources for s in table.column("source").to_pylist()], pa.bool_()))
            splits = [resplit.get(s, old) for s, old in zip(table.column("source").to_pylist(), table.column("split").to_pylist())]
            table = table.set_column(table.schema.get_field_index("split"), "split", pa.array(splits, pa.string()))
            pq.write_table(table, storage.arrow_fs(target)[1], filesystem=fs)
        else:
            storage.move(part, target)


def _write_jsonl(uri: str, records: list[dict]) -> None:
    storage.write_text(uri, "".join(json.dumps(r) + "\n" for r in records))


def plan_sources_of(plan: sources.Plan) -> list[str]:
    return sorted({u.uri for u in plan.units if u.uri} | ({"(files)"} if any(u.kind == "files" for u in plan.units) else set()))


def _reason_kind(reason: str) -> str:
    """Group reasons for the summary: the text before any ':' detail."""
    return reason.split(":")[0]


def _near_fate(manifest: dict) -> str:
    near = manifest.get("near_dedup") or {}
    fate = "dropped" if near.get("drop") else "kept, see near_duplicates.jsonl"
    return f"{fate}, distance <= {near.get('threshold')}"


def summary(manifest: dict) -> str:
    """A short human summary of a finished prepare."""
    c = manifest["counts"]
    secs = manifest["seconds"]
    rate = c["input"] / secs if secs else 0.0
    lines = [
        f"prepared {c['written']} images ({manifest['splits']['train']} train / {manifest['splits']['val']} val) "
        f"from {c['input']} inputs in {secs:.1f}s ({rate:.1f} images/s)",
        f"  rejected {c['rejected']}, duplicates {c['duplicates']}, near duplicates {c.get('near_duplicates', 0)} "
        f"({_near_fate(manifest)}), labels {len(manifest['labels'])}, shards {manifest['shards']}",
    ]
    for reason, n in sorted(manifest["reject_reasons"].items(), key=lambda kv: -kv[1]):
        lines.append(f"  - {n} x {reason}")
    for name, n in (manifest.get("label_counts") or {}).items():
        if not n["train"]:  # a class a model is asked to draw or name but never sees
            where = f"its {n['val']} images are all in val" if n["val"] else "no image of it was kept"
            lines.append(f"  ! label {name!r}: no training images ({where}; see rejected.jsonl and duplicates.jsonl)")
    return "\n".join(lines)
