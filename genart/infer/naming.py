"""Output names for batch inference: an input's relative path made safe, given the output extension, made unique.

    output_key("cats/../../evil.png", ".webp")  ->  "cats/evil.webp"
Nothing a user or an archive supplies can reach outside the output root: `..`, absolute paths, drive letters,
backslashes, NUL and control characters are removed here, once, for every job.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import posixpath
import re
import unicodedata

from genart import storage
from genart.data import sources
from genart.errors import UserError

# Files a job writes at the top of its output root: an input may never be named like them.
SIDECARS = sources.JOB_SIDECARS
NAMES = "names.json"  # {source: key} of every input that shares its plain key with another: kept across resumes
MAX_COMPONENT_BYTES = 200  # below the 255-byte limit of common filesystems, leaving room for "~N" and ".tmp-xxxx"
_UNSAFE = re.compile(r"[\x00-\x1f\x7f:*?\"<>|]")


def _component(part: str, max_bytes: int | None) -> str:
    part = unicodedata.normalize("NFC", part)
    part = _UNSAFE.sub("_", part).strip().lstrip(".")  # leading dots: no hidden files, no "..", no "."
    encoded = part.encode()
    if max_bytes and len(encoded) > max_bytes:
        part = encoded[:max_bytes].decode(errors="ignore").rstrip()  # stripped again: a cut can end on a space
    return part


def safe_rel(rel_path: str | None, max_bytes: int | None = MAX_COMPONENT_BYTES) -> str:
    """A relative POSIX path that stays inside any root: no '..', '.', absolute parts, backslashes or NUL; each
    part cut to `max_bytes` (None: not cut)."""
    text = str(rel_path or "").replace("\\", "/")
    parts = [_component(p, max_bytes) for p in text.split("/")]
    parts = [p for p in parts if p]
    if not parts:
        return "image"
    if parts[0] in SIDECARS or parts[0].startswith("part-"):
        parts[0] = "_" + parts[0]  # never shadow the job's own files (sidecars, parquet shards)
    return "/".join(parts)


def image_name(seed: int, index: int, num: int, ext: str) -> str:
    """`genart generate`'s name for image `index` of `num` drawn with `seed`: "seed3-000005.png"."""
    return f"seed{seed}-{index:0{max(6, len(str(num - 1)))}d}{ext}"


def output_key(rel_path: str | None, ext: str | None) -> str:
    """The output path (relative to the root) for an input: same folders and stem, `ext` (".png") or the input's own."""
    rel = safe_rel(rel_path)
    if ext is None:
        return rel
    folder, name = posixpath.split(rel)
    stem = posixpath.splitext(name)[0] or name or "image"
    return posixpath.join(folder, stem + ext)


def unique_keys(pairs: list[tuple[str, str]], fixed: dict[str, str] | None = None,
                done: set[str] | frozenset = frozenset()) -> dict[str, str]:
    """(source, key) for every input -> {source: its key} for every input whose plain key is not simply its own.

    Of inputs that share a key, the smallest source keeps it; the others get `stem~2.ext`, `stem~3.ext`...
    A key that is another key's folder (`shots.png` beside `shots.png/1.png`) is renamed the same way: a disk
    cannot hold a file and a folder of one name. Keys compare case-insensitively, so the output is also safe on
    case-insensitive filesystems.
    Resuming, `fixed` is the map the run's earlier starts wrote (`NAMES`) and `done` the keys already written:
    inputs in `fixed` keep their keys, and no other input takes one of those or a written `~N` key, so an output
    written before is never taken for another input's. A written key now shared by inputs that did not share it
    before, or now needed as a folder, is a UserError: which of them wrote it cannot be told.
    """
    fixed = fixed or {}
    reserved = {key.lower() for key in fixed.values()}
    groups: dict[str, list[str]] = collections.defaultdict(list)
    key_of = dict(pairs)
    for source, key in pairs:
        if source not in fixed:
            groups[key.lower()].append(source)
    written = {key.lower() for key in done}
    taken = {key.lower() for _, key in pairs} | reserved | written
    folders = {parent for key in taken for parent in _parents(key)}
    taken |= folders
    assigned = {source: key for source, key in fixed.items() if source in key_of}
    for lowered, group in groups.items():
        group = sorted(set(group))
        keeps_plain = lowered not in reserved and lowered not in folders
        if len(group) < 2 and keeps_plain:
            continue
        plain = key_of[group[0]]
        if lowered in written and lowered in folders:
            raise UserError(f"--resume: {plain} was written before other inputs came to need it as a folder (for "
                            f"{plain}/...); move the new inputs elsewhere or pass --overwrite")
        if keeps_plain and lowered in written:
            raise UserError(f"--resume: {plain} was written before other inputs came to share its name "
                            f"({', '.join(group[:3])}); move the new inputs elsewhere or pass --overwrite")
        if keeps_plain:
            assigned[group[0]] = plain
            group = group[1:]
        stem, ext = posixpath.splitext(plain)
        n = 2
        for source in group:
            while f"{stem}~{n}{ext}".lower() in taken:
                n += 1
            assigned[source] = f"{stem}~{n}{ext}"
            taken.add(assigned[source].lower())
    return assigned


def _parents(key: str) -> list[str]:
    """The folders of a key: "a/b/c.png" -> ["a", "a/b"]."""
    parts = key.split("/")[:-1]
    return ["/".join(parts[: i + 1]) for i in range(len(parts))]


def read_names(out: str) -> dict[str, str]:
    """The `NAMES` map an earlier start of the run at `out` wrote ({} if none)."""
    uri = storage.join(out, NAMES)
    if not storage.exists(uri):
        return {}
    try:
        names = json.loads(storage.read_text(uri))
    except ValueError:
        names = None
    if not isinstance(names, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in names.items()):
        raise UserError(f"--resume: {uri} is not a JSON object of input -> output name; pass --overwrite to start over")
    # Its names become output paths: one that safe_rel would change could leave the root or replace a sidecar.
    # (Not cut to length: a long name's `~N` and extension rightly go past the cap.)
    unsafe = next((v for v in names.values() if safe_rel(v, max_bytes=None) != v), None)
    if unsafe is not None:
        raise UserError(f"--resume: {uri} names an output {unsafe!r} that is not a plain path inside the output "
                        "folder; pass --overwrite to start over")
    return names


def write_names(out: str, fixed: dict[str, str], assigned: dict[str, str]) -> None:
    """Record every shared or renamed input's key, the earlier starts' too, for the next resume."""
    names = {**fixed, **assigned}
    if names and names != fixed:
        storage.write_text(storage.join(out, NAMES), json.dumps(names, indent=0, sort_keys=True) + "\n")


# ---------------------------------------------------------------- leaving out what is written


def prune_plan(plan: sources.Plan, keep) -> sources.Plan:
    """A copy of `plan` without the file and archive inputs for which `keep(source, rel_path)` is False.

    Parquet units are kept whole (their rows are only known once read); the job filters those rows itself.
    """
    units = []
    for unit in plan.units:
        if unit.kind == "parquet":
            units.append(unit)
            continue
        prefix = sources.item_prefix(unit)
        idx = [i for i, (item, rel) in enumerate(zip(unit.items, unit.rel_paths)) if keep(prefix + item, rel)]
        if idx:
            units.append(dataclasses.replace(unit, items=[unit.items[i] for i in idx],
                                             rel_paths=[unit.rel_paths[i] for i in idx], labels=[unit.labels[i] for i in idx]))
    failures = [f for f in plan.failures if keep(f["source"], f["source"])]
    return sources.Plan(units=units, label_names=plan.label_names, num_inputs=plan.num_inputs, failures=failures)
