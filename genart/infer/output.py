"""The output root of a batch-inference job: start / resume / overwrite checks, what is already done, the written files.

Layout: outputs (images mirroring the input tree, or `part-*.parquet` shards) + `run.json` (written first: the
command, input, model and options) + `errors.jsonl` + `manifest.json` (written last: the run is complete).
Every output object is written whole (temp file + rename, or one S3 PUT), so an output that exists is complete:
`--resume` treats existing outputs as done and processes the rest.
"""

from __future__ import annotations

import collections
import datetime as dt
import hashlib
import json
import os
import posixpath
import re
import tempfile
from typing import Callable, NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq

from genart import __version__, storage
from genart.data import sources
from genart.errors import UserError
from genart.infer import naming
from genart.infer.naming import SIDECARS

FORMAT_VERSION = 1
IMAGE_EXT = {"png": ".png", "jpeg": ".jpg", "webp": ".webp"}  # --format -> file extension
SHARD_PREFIX = "part-"
_TMP = re.compile(r"\.tmp-[0-9a-f]{8}$")  # storage.write_bytes' temp files, left behind by a killed run


def is_tmp(uri: str) -> bool:
    return bool(_TMP.search(uri))


def _is_ours(rel: str) -> bool:
    """Files a genart job may have written, by their names: what a --resume tolerates at its output root."""
    name = rel.rsplit("/", 1)[-1]
    return (rel in SIDECARS or is_tmp(rel) or (name.startswith(SHARD_PREFIX) and name.endswith(".parquet"))
            or rel.lower().endswith(tuple(IMAGE_EXT.values())))


def check_outside(src: str, out: str) -> None:
    """--output inside --input, or --input inside --output: refused before any work (a rerun would read its own
    outputs; --overwrite would clear the folder that holds the inputs)."""
    if storage.within(out, src):
        raise UserError(f"--output {out} is inside --input {src}: a rerun would read its own outputs; choose another --output")
    if storage.within(src, out):
        raise UserError(f"--input {src} is inside --output {out}: --overwrite could remove inputs; "
                        "move the inputs or choose another --output")


_GENERATED = re.compile(r"seed\d+-(\d+)\.png")  # naming.image_name's form for `genart generate --format png`


def _written_by(out: str, record: dict, current: tuple[str, sources.Plan] | None = None) -> Callable[[str], bool]:
    """`ours(rel)`: whether the file at `out`/rel is one the earlier run whose record (run.json, else manifest.json)
    is `record` wrote: a sidecar or temp file, one of its Parquet shards, an image it generated (by seed and index),
    or one it stylized (named again from the input it records, and names.json). Only these are --overwrite's to
    remove: a picture that merely ends in .png is an output only if the record names it. `current` is the job's own
    (input, plan): when the record names the same input, its listing is reused rather than made again."""
    fmt, command = record.get("format"), record.get("command")
    options = record.get("options") if isinstance(record.get("options"), dict) else {}
    src = record.get("input") if isinstance(record.get("input"), str) else None
    stylized = set()
    if command == "stylize" and fmt in IMAGE_EXT and src:
        plan = current[1] if current is not None and current[0] == src else None
        stylized = _stylized_keys(out, src, IMAGE_EXT[fmt], plan)
    # A run that read inside its output (refused since) never wrote its inputs. Where they lie is worked out once,
    # not per file (storage.within builds a filesystem per call: ~2 ms on S3, minutes over a large output).
    reads_all = bool(src) and storage.within(out, src)
    under = storage.relative(out, src) if src and not reads_all and storage.within(src, out) else None

    def ours(rel: str) -> bool:
        if reads_all or (under is not None and (rel == under or rel.startswith(under + "/"))):
            return False
        rel = _TMP.sub("", rel)
        if rel in SIDECARS or rel in stylized:
            return True
        if fmt == "parquet":
            return "/" not in rel and rel.startswith(SHARD_PREFIX) and rel.endswith(".parquet")
        return command == "generate" and _generated(options.get("seed"), options.get("num"), rel)

    return ours


def _generated(seed, num, rel: str) -> bool:
    """Whether `rel` is one of the images `genart generate` names for `seed` and `num`."""
    match = _GENERATED.fullmatch(rel)
    return (match is not None and isinstance(num, int) and int(match[1]) < num
            and rel == naming.image_name(seed, int(match[1]), num, ".png"))


def _stylized_keys(out: str, src: str, ext: str, plan: sources.Plan | None = None) -> set[str]:
    """The output names of the inputs under `src` (its `plan`, else listed again now) and those names.json at `out`
    records."""
    try:
        plan = plan or sources.plan([src])
        failed = {f["source"] for f in plan.failures}  # never written: their names name nothing
        keys = {naming.output_key(rel, ext) for source, rel in sources.input_names(plan) if source not in failed}
    except UserError:  # the input is gone or holds nothing now: its outputs cannot be told apart from other files
        keys = set()
    try:
        keys |= set(naming.read_names(out).values())
    except UserError:  # an unreadable names.json names nothing (it is a sidecar itself, removed with the run)
        pass
    return keys


class Begin(NamedTuple):
    """What `check` found at the output root, for `commit` to carry out."""

    resume: bool  # the outputs there are this run's: they count as done
    remove: list[str]  # what goes before the run starts: an earlier run's outputs (--overwrite), stray temp files


def start(out: str, run: dict, resume: bool, overwrite: bool, redo_changed: bool = False) -> Begin:
    """`check` then `commit`, for a job that has nothing else to check before it starts."""
    begin = check(out, run, resume, overwrite, redo_changed)
    commit(out, run, begin)
    return begin


def check(out: str, run: dict, resume: bool, overwrite: bool, redo_changed: bool = False,
          plan: sources.Plan | None = None) -> Begin:
    """Check the output root for `run`; raise UserError if it is in the way. Changes nothing (but a probe of
    writability): `commit` does, once the job's own checks have passed too.

    `run` (command, input, model hash, options) must equal the stored one to --resume: outputs made with other
    options or another model must never be mixed in. redo_changed (workflows): such a resume starts over instead,
    as a rerun after retraining should. `plan` is the job's listing of `run`'s input, if it has one.
    """
    if resume and overwrite:
        raise UserError("pass either --resume (finish the run at --output) or --overwrite (start over), not both")
    manifest_uri, run_uri = storage.join(out, "manifest.json"), storage.join(out, "run.json")
    has_manifest, has_run = storage.exists(manifest_uri), storage.exists(run_uri)
    earlier = has_run or has_manifest
    files = [(u, storage.relative(out, u)) for u, _ in storage.find(out)] if storage.exists(out) else []
    stored = read_record(run_uri) if has_run else None
    if resume and redo_changed and earlier and stored != run:
        resume, overwrite = False, True
    if resume and earlier:
        if stored != run:
            diff = first_difference(stored or {}, run)
            raise UserError(f"--resume: {out} was written by a different run ({diff}); rerun with the same "
                            "arguments, or pass --overwrite to start over")
        foreign = [rel for _, rel in files if not _is_ours(rel)]
        remove = [uri for uri, rel in files if is_tmp(rel)]
    elif overwrite and earlier:
        ours = _written_by(out, stored if stored is not None else read_record(manifest_uri),
                           None if plan is None else (run.get("input"), plan))
        owned = [(uri, rel, ours(rel)) for uri, rel in files]
        foreign = [rel for _, rel, mine in owned if not mine]
        remove = [uri for uri, _, mine in owned if mine]
    elif has_manifest:
        raise UserError(f"{out} already holds finished output; pass --overwrite to replace it or choose another --output")
    elif has_run:
        raise UserError(f"{out} holds an interrupted run; pass --resume to finish it or --overwrite to start over")
    else:
        foreign, remove = [rel for _, rel in files], []
    if foreign and overwrite and earlier:
        raise UserError(f"{out} holds files its earlier run did not write (e.g. {foreign[0]}), and --overwrite removes "
                        "only those; move them or choose an empty --output")
    if foreign:
        raise UserError(f"{out} holds files that are not this job's output (e.g. {foreign[0]}); choose an empty --output")
    storage.check_writable(out)
    return Begin(resume=resume and earlier, remove=remove)


def commit(out: str, run: dict, begin: Begin) -> None:
    """Start the run `check` cleared: remove what it listed, mark the output unfinished, record the run."""
    for uri in begin.remove:
        storage.remove(uri)
    storage.remove(storage.join(out, "manifest.json"))  # the run is incomplete again until it finishes
    storage.write_text(storage.join(out, "run.json"), json.dumps(run, indent=2, sort_keys=True) + "\n")


def input_run(src: str) -> dict | None:
    """When `src` is, or lies inside, another job's output folder (genart generate's samples, stylize's pictures):
    what made those pictures, that job's command, input, model, options and its own input_run. A job on them records
    it, so a resume after the folder was redrawn under the same file names (a retrained generator, another archive
    stylized with --overwrite) is another run, not the same one with stale outputs."""
    folder = src.rstrip("/") if storage.isdir(src) else posixpath.dirname(src.rstrip("/"))
    while folder and folder not in ("/", "s3:"):
        try:
            record = read_record(storage.join(folder, "run.json"))
        except OSError:  # S3's AccessDenied above a role's prefix, a folder named run.json: not a job's record
            record = {}
        if isinstance(record.get("command"), str) and "model_hash" in record:
            return {key: record.get(key) for key in ("command", "input", "model_hash", "options", "input_run")}
        parent = posixpath.dirname(folder)
        if parent == folder:
            break
        folder = parent
    return None


def read_record(uri: str) -> dict:
    """A run.json or manifest.json as a dict ({} if it is not one: it then explains nothing)."""
    try:
        record = json.loads(storage.read_text(uri))
    except (ValueError, UserError):
        return {}
    return record if isinstance(record, dict) else {}


def first_difference(stored: dict, run: dict) -> str:
    """Where two run records first differ: "key: old then, new now" (dotted into nested dicts)."""
    for key in sorted(set(stored) | set(run)):
        if stored.get(key) != run.get(key):
            if isinstance(stored.get(key), dict) and isinstance(run.get(key), dict):
                return f"{key}.{first_difference(stored[key], run[key])}"
            return f"{key}: {stored.get(key)!r} then, {run.get(key)!r} now"
    return "no run.json"


def done_keys(out: str, fmt: str) -> set[str]:
    """Keys (paths relative to the root) of the outputs already written: image files, or rows of the shards."""
    if not storage.exists(out):
        return set()
    if fmt != "parquet":
        rels = (storage.relative(out, u) for u, _ in storage.find(out))
        return {r for r in rels if r not in SIDECARS and not is_tmp(r)}
    keys: set[str] = set()
    for uri in shards(out):
        keys.update(read_shard(uri, ["key"]).column("key").to_pylist())
    return keys


def shards(out: str) -> list[str]:
    return [u for u in storage.listdir(out) if u.rsplit("/", 1)[-1].startswith(SHARD_PREFIX) and u.endswith(".parquet")]


def read_shard(uri: str, columns: list[str] | None = None) -> pa.Table:
    """One Parquet shard (local or s3://) as an Arrow table, optionally only `columns`."""
    fs, path = storage.arrow_fs(uri)
    return pq.read_table(path, filesystem=fs, columns=columns)


def write_shard(out: str, table: pa.Table) -> str:
    """Write one batch of rows as a complete Parquet shard, named by its keys (a retried batch rewrites its own file)."""
    digest = hashlib.sha1("\n".join(sorted(table.column("key").to_pylist())).encode()).hexdigest()[:20]
    uri = storage.join(out, f"{SHARD_PREFIX}{digest}.parquet")
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    storage.write_bytes(uri, sink.getvalue().to_pybytes())
    return uri


def dedupe_shards(out: str) -> int:
    """Drop rows whose key is also in an earlier shard (a task retried with a differently cut batch); returns rows dropped.

    Decided whole before any file changes: a shard left with some of its rows is rewritten under the name of the
    keys it keeps, which can be the name of a later shard holding just those keys. Rewritten in one pass, that shard
    was overwritten and then deleted as a duplicate of itself, and its rows were lost. So the shards whose every row
    is kept elsewhere go first, then the partial ones are written anew (before their old file goes: a crash leaves
    duplicates for the next pass, never a gap)."""
    listed = sorted(shards(out))
    keys = {uri: read_shard(uri, ["key"]).column("key").to_pylist() for uri in listed}
    owner: dict[str, str] = {}
    for uri in listed:
        for key in keys[uri]:
            owner.setdefault(key, uri)
    masks = {uri: [owner[key] == uri for key in keys[uri]] for uri in listed}
    dropped = sum(mask.count(False) for mask in masks.values())
    for uri in listed:
        if keys[uri] and not any(masks[uri]):
            storage.remove(uri)
    for uri in listed:
        if any(masks[uri]) and not all(masks[uri]):
            write_shard(out, read_shard(uri).filter(pa.array(masks[uri])))
            storage.remove(uri)
    return dropped


class Tally:
    """Driver-side record of the per-row statuses streamed back by a job: counts and errors, never image data."""

    def __init__(self):
        self.written = 0
        self.reasons: collections.Counter = collections.Counter()
        self.failed_sources: set[str] = set()
        self._errors = tempfile.TemporaryFile("w+")  # may be long (a broken million-member archive); kept on disk

    def add(self, status: pa.Table) -> None:
        for source, error in zip(status.column("source").to_pylist(), status.column("error").to_pylist()):
            if error is None:
                self.written += 1
            else:
                self.reasons[error.split(":")[0]] += 1
                self.failed_sources.add(source)
                self._errors.write(json.dumps({"source": source, "reason": error}) + "\n")

    @property
    def errors(self) -> int:
        return sum(self.reasons.values())

    def errors_jsonl(self) -> str:
        """All errors, sorted by source, so a resumed run ends with the same file as an uninterrupted one."""
        self._errors.seek(0)
        return "".join(sorted(self._errors.readlines()))


class Progress:
    """The live line of a batch job on a terminal: images done / total, images/s, ETA, errors so far (tqdm).
    Silent when stderr is not a TTY (logs, CI, Ray job logs) or when the job asks for no progress."""

    def __init__(self, command: str, total: int, enabled: bool = True, stream=None, min_interval_s: float = 0.5):
        import sys

        from tqdm import tqdm

        stream = stream or sys.stderr
        self.command = command
        self.enabled = bool(enabled and total > 0 and getattr(stream, "isatty", lambda: False)())
        self.bar = tqdm(total=total, desc=command, unit="img", file=stream, disable=not self.enabled,
                        dynamic_ncols=True, smoothing=0.1, leave=False, mininterval=min_interval_s,
                        bar_format="{desc}: {n_fmt}/{total_fmt} {bar} {rate_fmt} ETA {remaining}{postfix}")

    def update(self, tally: Tally, done: int) -> None:
        self.advance(done, tally.errors)

    def advance(self, done: int, errors: int = 0) -> None:
        """`done` more images, `errors` so far (for jobs without a Tally, e.g. `genart evaluate`)."""
        if self.enabled:
            self.bar.set_postfix_str(f"{errors} errors", refresh=False)
            self.bar.update(done)

    def close(self) -> None:
        if self.enabled:
            self.bar.refresh()  # the final count: updates within min_interval_s of the last draw were not drawn
        self.bar.close()


def finish(out: str, fmt: str, tally: Tally, manifest: dict, extra_files: dict[str, str] | None = None) -> dict:
    """Write errors.jsonl (and any extra sidecars), remove stray temp files, then manifest.json last."""
    if fmt == "parquet":
        manifest["shards"] = sorted(storage.relative(out, u) for u in shards(out))
    storage.write_text(storage.join(out, "errors.jsonl"), tally.errors_jsonl())
    for name, text in (extra_files or {}).items():
        storage.write_text(storage.join(out, name), text)
    if not storage.is_s3(out):
        for uri, _ in storage.find(out):
            if is_tmp(uri):
                os.remove(uri)
    manifest.update(version=FORMAT_VERSION, created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                    genart_version=__version__)
    storage.write_text(storage.join(out, "manifest.json"), json.dumps(manifest, indent=2) + "\n")
    return manifest


def summary(manifest: dict) -> str:
    """A short human summary of a finished job."""
    c = manifest["counts"]
    lines = [
        f"{manifest['command']}: {c['written']} outputs from {c['inputs']} inputs, {c['errors']} errors "
        f"in {manifest['seconds']:.1f}s ({manifest['images_per_second']:.1f} images/s this run)",
    ]
    if c.get("already_done"):
        lines.append(f"  resumed: {c['already_done']} outputs were already there, {c['written_this_run']} written now")
    for reason, n in sorted(manifest.get("error_reasons", {}).items(), key=lambda kv: -kv[1]):
        lines.append(f"  - {n} x {reason}")
    lines.append(f"  outputs: {manifest['output']} (manifest.json, errors.jsonl)")
    return "\n".join(lines)
