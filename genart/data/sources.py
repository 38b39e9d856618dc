"""Where images come from: folders, zip/tar archives, Parquet datasets, MNIST-style idx files and s3:// prefixes,
as one Ray Dataset.

The driver only *plans*: it lists every input (file, archive member or Parquet row) and groups them into
units. Ray tasks then read the units in parallel and emit one raw record per input, with either its bytes
or the reason it could not be read. Every planned input yields exactly one record: nothing is dropped silently.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import gzip
import json
import posixpath
import re
import stat
import struct
import tarfile
import zlib
import zipfile
from dataclasses import dataclass, field
from typing import Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from genart import storage
from genart.errors import UserError, one_line

ZIP_EXT = (".zip",)
TAR_EXT = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
PARQUET_EXT = (".parquet",)
# MNIST-style idx pairs (MNIST, Fashion-MNIST, EMNIST; Kaggle's "t10k-images.idx3-ubyte" spelling too): unsigned-byte
# images (N x rows x cols) with, beside them, the labels file of the same name (N bytes). Optionally gzipped.
IDX_IMAGES = re.compile(r"images([-.])idx3([-.])ubyte(\.gz)?$", re.IGNORECASE)
IDX_LABELS = re.compile(r"labels[-.]idx1[-.]ubyte(\.gz)?$", re.IGNORECASE)
IDX_IMAGES_PER_UNIT = 2048
IDX_MAX_IMAGES = 10_000_000
IDX_MAX_SIDE = 4096
IDX_MAX_BYTES = 4 << 30  # decompressed pixel bytes of one idx file
# Files a prepared dataset keeps beside its shards, and files a batch job writes at its output root: never inputs
# (so one job's output folder can be the next one's input, e.g. stylize -> score).
DATASET_SIDECARS = ("manifest.json", "rejected.jsonl", "duplicates.jsonl", "near_duplicates.jsonl")
JOB_SIDECARS = ("manifest.json", "errors.jsonl", "images.jsonl", "run.json", "names.json")
FILES_PER_UNIT = 64
TABLE_BYTES = 64 << 20  # a reader hands its records on once they hold this many bytes, whatever their count
IDX_IMAGES_PER_TABLE = 64  # idx images per records table (28x28 digits: small; a table per image would be slow)
# Rows a Parquet reader decodes at a time. A dictionary-encoded column expands every repeat of a value on read (one
# 4 MiB blob repeated 64 times is a few hundred bytes on disk, 256 MiB as one 64-row batch) before any cap can look at
# the rows; 8 rows bound that to 8 copies, for ~20 us a row more than 64 at a time (measured on 3 KB rows; decoding
# and hashing one takes ~1.4 ms). A page or dictionary value is still decompressed whole, whatever its size.
PARQUET_ROWS_PER_READ = 8

RAW_SCHEMA = pa.schema(
    [
        ("source", pa.string()),  # where the input came from: path, s3 URI, "archive!member" or "file#row"
        ("rel_path", pa.string()),  # path relative to its SRC root (archive members: inside the archive)
        ("label_name", pa.string()),  # first-level folder under the root, or null
        ("data", pa.binary()),  # the raw bytes, null when unreadable
        ("error", pa.string()),  # why it could not be read, else null
    ]
)


@dataclass
class Unit:
    """One read task: a batch of files, some members of one archive, one Parquet file, or a run of idx images."""

    kind: str  # "files" | "zip" | "tar" | "parquet" | "idx"
    uri: str  # the archive, Parquet or idx images file ("" for plain files)
    items: list[str] = field(default_factory=list)  # file URIs, archive member names or idx image indices
    rel_paths: list[str] = field(default_factory=list)
    labels: list[str | None] = field(default_factory=list)
    rows: int = 0  # parquet: number of rows
    copies: dict[str, int] = field(default_factory=dict)  # tar: how many copies of a repeated name (the last is read)
    label_column: bool = True  # parquet: whether rows take their own label_name value
    folder_label: str | None = None  # parquet: the label of rows without one of their own (their folder's)

    @property
    def count(self) -> int:
        return self.rows if self.kind == "parquet" else len(self.items)


@dataclass
class Plan:
    units: list[Unit]
    label_names: list[str]  # sorted; index = integer label
    num_inputs: int
    failures: list[dict]  # inputs that failed while planning (an unreadable archive): {"source", "reason"}


def _has_ext(uri: str, exts: tuple[str, ...]) -> bool:
    return uri.lower().endswith(exts)


def _label_of(rel: str, use_dirs: bool) -> str | None:
    parts = rel.split("/")
    return parts[0] if use_dirs and len(parts) > 1 else None


HIDDEN_REASON = "hidden or system file (a dot-name, or macOS's __MACOSX/): not read"
# A name in another encoding (Latin-1 from an old archive or disk): Python holds its odd bytes as surrogates, which
# no Arrow table, JSON record or output name can carry, so it is reported with them escaped (caf\xe9.jpg), not read.
BAD_NAME_REASON = "name is not valid UTF-8 (shown with its odd bytes as \\xNN): not read; rename it to UTF-8 (e.g. convmv)"


def _bad_name(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _printable(name: str) -> str:
    """A name as text any record can hold: bytes that are not UTF-8 written as \\xNN."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _hidden(rel: str) -> bool:
    """Dot-files and dot-folders (.DS_Store, ._photo.jpg, .ipynb_checkpoints/) and macOS's __MACOSX/ in zips: never
    the pictures of a dataset, and as folders they would become classes of their own."""
    return any(part.startswith(".") or part == "__MACOSX" for part in rel.split("/") if part not in ("", ".", ".."))


# reading a pipe waits forever for a writer, a device may never end: never opened
SPECIAL_REASON = "not a regular file (a pipe, socket, device or link to a folder): not read"
EMPTY_NAME_REASON = "archive member without a name (only '/', '.' or '..' in it): not read"


def _member_path(name: str) -> str | None:
    """An archive member's name as a plain relative path inside the archive: '\\' separators (zips from old Windows
    tools) made '/', and the empty, '.' and '..' parts of '/abs', './photos' (`tar cf x.tar ./photos`), 'a//b' or
    '../../x.png' dropped, as `unzip` does when it extracts ('../../x.png' is x.png; GNU tar strips a leading '/'
    and '../' too, and skips other names with '..'); None if nothing is left. Members are still read by their raw
    names."""
    parts = [part for part in name.replace("\\", "/").split("/") if part not in ("", ".", "..")]
    return "/".join(parts) or None


def _strip_common_root(names: list[str]) -> list[str]:
    """Archives often wrap everything in one top folder; drop it so labels are the folders below."""
    tops = {n.split("/", 1)[0] for n in names}
    if len(tops) == 1 and all("/" in n for n in names):
        return [n.split("/", 1)[1] for n in names]
    return names


def plan(sources: list[str], labels: str | None = None) -> Plan:
    """List every input under `sources`. labels: "dirs", "none", or None (dirs when a SRC has subfolders)."""
    units: list[Unit] = []
    failures: list[dict] = []
    for i, src in enumerate(sources):
        if not storage.exists(src):
            raise UserError(f"source not found: {src}")
        for other in sources[:i]:  # an input listed twice would be read, counted and written twice
            if storage.within(src, other) or storage.within(other, src):
                raise UserError(f"sources {other} and {src} overlap (one is, or holds, the other): give each input once")
        units.extend(_plan_source(str(src), labels, failures))
    num_inputs = sum(u.count for u in units) + len(failures)
    if num_inputs == 0:
        raise UserError(f"no input files found in {', '.join(map(str, sources))}")
    names = sorted({lab for u in units for lab in u.labels if lab})
    return Plan(units=units, label_names=names, num_inputs=num_inputs, failures=failures)


def _plan_source(src: str, labels: str | None, failures: list[dict]) -> list[Unit]:
    if _bad_name(src):
        raise UserError(f"source {_printable(src)}: the name is not valid UTF-8; rename it to UTF-8 (e.g. convmv)")
    if not storage.isdir(src):
        if storage.special(src):
            raise UserError(f"source {src}: {SPECIAL_REASON}")
        rel = posixpath.basename(src.rstrip("/"))
        return _plan_file(src, rel, None, labels, failures)
    files, specials = [], []
    listed = storage.find(src, specials)
    failures.extend({"source": _printable(f), "reason": SPECIAL_REASON} for f in specials)
    for f, size in _without_output_files(listed):
        if _bad_name(f):
            failures.append({"source": _printable(f), "reason": BAD_NAME_REASON})
        elif _hidden(storage.relative(src, f)):
            failures.append({"source": f, "reason": HIDDEN_REASON})
        else:
            files.append((f, size))
    rels = [storage.relative(src, f) for f, _ in files]
    use_dirs = labels == "dirs" or (labels is None and any("/" in r for r in rels))
    paired = {c for f, _ in files if _is_idx(f, IDX_IMAGES) for c in _idx_partners(f)}  # labels files in use
    plain: list[tuple[str, str, str | None]] = []
    units: list[Unit] = []
    for (uri, _), rel in zip(files, rels):
        label = _label_of(rel, use_dirs)
        if _has_ext(uri, ZIP_EXT + TAR_EXT + PARQUET_EXT) or _is_idx(uri, IDX_IMAGES):
            units.extend(_plan_file(uri, rel, label, labels, failures))
        elif _is_idx(uri, IDX_LABELS):
            if uri not in paired:
                failures.append({"source": uri, "reason": "bad idx file: a labels file without its "
                                 "*-images-idx3-ubyte[.gz] file beside it"})
        else:
            plain.append((uri, rel, label))
    for i in range(0, len(plain), FILES_PER_UNIT):
        chunk = plain[i : i + FILES_PER_UNIT]
        units.append(Unit("files", "", [c[0] for c in chunk], [c[1] for c in chunk], [c[2] for c in chunk]))
    return units


def _without_output_files(files: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """Inside a folder genart wrote (it holds a manifest.json): a prepared dataset or a job's Parquet output is
    its shards; a job's image output is its images, without the job's own files. Files outside such folders
    (photos beside an earlier job's output, say) stay inputs."""
    outputs = {posixpath.dirname(f) for f, _ in files if posixpath.basename(f) == "manifest.json" and _is_genart_manifest(f)}
    if not outputs:
        return files

    def owner(f: str) -> str | None:  # the innermost output folder holding f: up its folders, one set lookup each
        folder = posixpath.dirname(f)
        while folder not in outputs:
            parent = posixpath.dirname(folder)
            if parent == folder:
                return None
            folder = parent
        return folder

    with_shards = {owner(f) for f, _ in files if _has_ext(f, PARQUET_EXT)} - {None}
    sidecars = set(DATASET_SIDECARS + JOB_SIDECARS)
    kept = []
    for f, size in files:
        home = owner(f)
        if home is None:
            kept.append((f, size))
        elif home in with_shards:
            if _has_ext(f, PARQUET_EXT):
                kept.append((f, size))
        elif not (posixpath.basename(f) in sidecars and posixpath.dirname(f) == home):
            kept.append((f, size))
    return kept


def _is_genart_manifest(uri: str) -> bool:
    """A manifest.json that genart wrote: a prepared dataset's (genart_version, splits) or a job's (command, counts).
    Another tool's manifest.json beside its own files leaves them inputs."""
    try:
        doc = json.loads(storage.read_text(uri))
    except (ValueError, UserError, OSError):
        return False
    return isinstance(doc, dict) and isinstance(doc.get("counts"), dict) and (
        ("genart_version" in doc and "splits" in doc) or isinstance(doc.get("command"), str))


def _plan_file(uri: str, rel: str, label: str | None, labels: str | None, failures: list[dict]) -> list[Unit]:
    """Units for one file: an archive (its members), a Parquet file, or a single image. `label` is inherited."""
    if _has_ext(uri, ZIP_EXT) or _has_ext(uri, TAR_EXT):
        try:
            listed = _zip_members(uri) if _has_ext(uri, ZIP_EXT) else _tar_members(uri)
        except Exception as exc:  # noqa: BLE001 - a broken archive is one reported input, not a crash
            failures.append({"source": uri, "reason": f"unreadable archive: {one_line(exc)}"})
            return []
        # A path can repeat (`tar -r`/`-u` append newer copies; `x.png` and `./x.png` are one path): one input per
        # path, decided by its last copy (the one `tar -x` and `unzip` leave on disk), each earlier copy a reject.
        # Members are read by raw name, and a reader counts a raw name's copies to find the one planned.
        by_path: dict[str, list[tuple[str, str | None]]] = {}  # path (the raw name if none) -> its members, in order
        for name, skipped in listed:
            by_path.setdefault(_member_path(name) or name, []).append((name, skipped))
        raw_counts = collections.Counter(name for name, _ in listed)
        copies = {name: count for name, count in raw_counts.items() if count > 1}
        names, paths = [], []
        for path, members in by_path.items():
            *earlier, (name, skipped) = members
            passed: collections.Counter = collections.Counter()
            for other, _ in earlier:
                passed[other] += 1
                copy = f" (copy {passed[other]})" if raw_counts[other] > 1 else ""
                failures.append({"source": f"{uri}!{other}{copy}", "reason": "duplicate member name in the archive: "
                                 "only the last copy of each name is read"})
            reason = skipped or (EMPTY_NAME_REASON if _member_path(name) is None else HIDDEN_REASON if _hidden(path) else None)
            if reason:
                failures.append({"source": f"{uri}!{name}", "reason": reason})
            else:
                names.append(name)
                paths.append(path)
        inner = _strip_common_root(paths)
        dirs = labels == "dirs" or (labels is None and any("/" in n for n in inner))
        labs = [label or _label_of(n, dirs) for n in inner]
        kind = "zip" if _has_ext(uri, ZIP_EXT) else "tar"
        if kind == "tar":  # a tar stream is read start to end by one task
            return [Unit(kind, uri, names, inner, labs, copies=copies)]
        return [
            Unit(kind, uri, names[i : i + FILES_PER_UNIT], inner[i : i + FILES_PER_UNIT], labs[i : i + FILES_PER_UNIT])
            for i in range(0, len(names), FILES_PER_UNIT)
        ]
    if _has_ext(uri, PARQUET_EXT):
        # Labelled as an idx file is: a row's own label_name, else its folder's label; with --labels dirs its
        # folder's label (when it has one); with --labels none, none.
        column = labels != "none" and not (labels == "dirs" and label)
        folder_label = None if labels == "none" else label
        try:
            fs, path = storage.arrow_fs(uri)
            with fs.open_input_file(path) as f:
                meta = pq.ParquetFile(f)
                rows = meta.metadata.num_rows
                own = {None} if rows else set()  # the labels the rows hold themselves (None: none)
                if column and "label_name" in meta.schema_arrow.names:
                    own = {v or None for v in _strings(meta.read(columns=["label_name"]).column(0))}
        except Exception as exc:  # noqa: BLE001
            failures.append({"source": uri, "reason": f"unreadable parquet file: {one_line(exc)}"})
            return []
        # The labels the rows will get, for the plan's label map (the reader labels each row by the same rule).
        labs = sorted({v or folder_label for v in own} - {None})
        return [Unit("parquet", uri, [], [rel], labs, rows=rows, label_column=column, folder_label=folder_label)]
    if _is_idx(uri, IDX_IMAGES):
        return _plan_idx(uri, rel, label, labels, failures)
    if _is_idx(uri, IDX_LABELS):
        failures.append({"source": uri, "reason": "bad idx file: a labels file holds no images; "
                         "give its *-images-idx3-ubyte[.gz] file or their folder"})
        return []
    return [Unit("files", "", [uri], [rel], [label])]


class IdxError(ValueError):
    """An idx file whose header or length is wrong; the message is the whole reason."""


def _is_idx(uri: str, pattern: re.Pattern) -> bool:
    return pattern.search(posixpath.basename(uri)) is not None


def _idx_partners(images_uri: str) -> list[str]:
    """The labels files that can go with an images file: same folder and name, gzipped or not (same kind first)."""
    folder, name = posixpath.split(images_uri)
    stem = IDX_IMAGES.sub(r"labels\1idx1\2ubyte", name)
    candidates = [posixpath.join(folder, stem + ".gz"), posixpath.join(folder, stem)]
    return candidates if images_uri.lower().endswith(".gz") else candidates[::-1]


@contextlib.contextmanager
def _idx_open(uri: str):
    """The idx file as one decompressed byte stream."""
    fs, path = storage.fsspec_fs(uri)
    with fs.open(path, "rb") as raw:
        if uri.lower().endswith(".gz"):
            with gzip.GzipFile(fileobj=raw, mode="rb") as f:
                yield f
        else:
            yield raw


def _idx_header(f, ndim: int) -> tuple[int, ...]:
    """Check the magic number (0x0000 08 ndim: unsigned bytes, ndim dimensions) and return the dimensions."""
    head = f.read(4 + 4 * ndim)
    if len(head) < 4 + 4 * ndim:
        raise IdxError(f"truncated header ({len(head)} of {4 + 4 * ndim} bytes)")
    if head[:3] != b"\x00\x00\x08" or head[3] != ndim:
        raise IdxError(f"magic number 0x{head[:4].hex()}, expected 0x0000080{ndim} (idx{ndim}, unsigned bytes)")
    return struct.unpack(f">{ndim}I", head[4:])


def _idx_reason(exc: Exception) -> str:
    if isinstance(exc, IdxError):
        return f"bad idx file: {exc}"
    if isinstance(exc, (EOFError, zlib.error, gzip.BadGzipFile)):
        return f"bad idx file: truncated or corrupt gzip stream ({one_line(exc)})"
    return f"unreadable idx file: {one_line(exc)}"


def _plan_idx(uri: str, rel: str, label: str | None, labels: str | None, failures: list[dict]) -> list[Unit]:
    """Units for an idx images file, labelled from its labels file ("0".."9" for MNIST). The whole file is
    checked here (header, caps, exact length) so a truncated download is one clear reject, not 10,000."""
    try:
        with _idx_open(uri) as f:
            count, rows, cols = _idx_header(f, 3)
            if not (0 < count <= IDX_MAX_IMAGES and 0 < rows <= IDX_MAX_SIDE and 0 < cols <= IDX_MAX_SIDE) \
                    or count * rows * cols > IDX_MAX_BYTES:
                raise IdxError(f"header says {count} images of {rows}x{cols}: outside the caps (1..{IDX_MAX_IMAGES} "
                               f"images, 1..{IDX_MAX_SIDE} px a side, {IDX_MAX_BYTES} bytes)")
            expected, found = count * rows * cols, 0
            while found <= expected and (chunk := f.read(1 << 20)):
                found += len(chunk)
            if found != expected:
                holds = f"{found} bytes" if found < expected else "more"
                raise IdxError(f"{'truncated' if found < expected else 'trailing bytes'}: header says {count} images "
                               f"of {rows}x{cols} ({expected} bytes of pixels), the file holds {holds}; fetch it again")
        digits = None if labels == "none" else _idx_labels(uri, count)
    except Exception as exc:  # noqa: BLE001 - a broken idx file is one reported input, not a crash
        failures.append({"source": uri, "reason": _idx_reason(exc)})
        return []
    if labels == "none":
        labs: list[str | None] = [None] * count
    elif digits is None or (labels == "dirs" and label):
        labs = [label] * count  # no labels file (or folder labels asked for): the inherited folder label
    else:
        labs = digits
    units = []
    for lo in range(0, count, IDX_IMAGES_PER_UNIT):
        run = range(lo, min(count, lo + IDX_IMAGES_PER_UNIT))
        units.append(Unit("idx", uri, [str(i) for i in run], [f"{rel}#{i}" for i in run], labs[run.start : run.stop]))
    return units


def _idx_labels(images_uri: str, count: int) -> list[str] | None:
    """Label names from the labels file beside `images_uri` (None when there is none); IdxError if it does not fit."""
    partner = next((c for c in _idx_partners(images_uri) if storage.exists(c)), None)
    if partner is None:
        return None
    name = posixpath.basename(partner)
    with _idx_open(partner) as f:
        (n,) = _idx_header(f, 1)
        if n != count:
            raise IdxError(f"{name} holds {n} labels for {count} images")
        data = f.read(n + 1)
    if len(data) != n:
        raise IdxError(f"{name}: {'truncated' if len(data) < n else 'trailing bytes'}: header says {n} labels, "
                       f"the file holds {len(data) if len(data) < n else 'more'}")
    return [str(b) for b in data]


def _link_reason(kind: str, target: str) -> str:
    if kind == "hard":  # its bytes are its target's: reading it would only make an exact duplicate
        return f"hard link in the archive: not read (a link to {target}, which is read as itself)"
    return f"symbolic link in the archive: not read (a link to {target})"


def _zip_members(uri: str) -> list[tuple[str, str | None]]:
    """(name, why it is not read or None) of every member that is not a folder, in archive order."""
    fs, path = storage.fsspec_fs(uri)
    members = []
    with fs.open(path, "rb") as f, zipfile.ZipFile(f) as zf:
        for info in zf.infolist():
            if info.is_dir() or info.filename.endswith("\\"):  # a folder entry (old Windows tools end it in a backslash)
                continue
            is_link = stat.S_ISLNK(info.external_attr >> 16)  # Info-ZIP's `zip -y`: the Unix mode says symlink
            members.append((info.filename, _link_reason("symbolic", _zip_link_target(zf, info)) if is_link else None))
    return members


def _zip_link_target(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> str:
    """A zip symlink's target: the member's bytes are the path it points to."""
    try:
        with zf.open(info) as link:
            return link.read(1024).decode(errors="replace")
    except Exception:  # noqa: BLE001 - encrypted or corrupt: still a link, reported without its target
        return "a target that cannot be read"


def _tar_members(uri: str) -> list[tuple[str, str | None]]:
    """(name, why it is not read or None) of every member that is not a folder, in archive order."""
    fs, path = storage.fsspec_fs(uri)
    members = []
    with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tf:
        for member in tf:
            if member.isdir():
                continue
            if _bad_name(member.name):  # (zip decodes such names as cp437: always text)
                members.append((_printable(member.name), BAD_NAME_REASON))
            else:
                members.append((member.name, _tar_skip_reason(member)))
    return members


def _tar_skip_reason(member: tarfile.TarInfo) -> str | None:
    """Why a tar member that is not a folder is not read (None: a regular file, read)."""
    if member.islnk():  # GNU tar stores a file's second and later hard links as links to the first
        return _link_reason("hard", member.linkname)
    if member.issym():
        return _link_reason("symbolic", member.linkname)
    if not member.isfile():
        return "device, pipe or other special file in the archive: not read"
    return None


# ---------------------------------------------------------------- reading (runs inside Ray tasks)


def read_unit(unit: Unit, max_bytes: int | None = None) -> Iterator[pa.Table]:
    """Yield raw records (RAW_SCHEMA tables) for one unit: one row per planned input, always."""
    readers = {"files": _read_files, "zip": _read_zip, "tar": _read_tar, "parquet": _read_parquet, "idx": _read_idx}
    yield from readers[unit.kind](unit, max_bytes)


def _table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=RAW_SCHEMA)


def _record(source, rel, label, data=None, error=None) -> dict:
    return {"source": source, "rel_path": rel, "label_name": label, "data": data, "error": error}


def _too_big(size: int, max_bytes: int | None) -> str | None:
    return f"file too large: {size} bytes > cap {max_bytes}" if max_bytes and size > max_bytes else None


def _full(rows: list[dict]) -> bool:
    """Whether a reader should hand its records on now: by count, or by bytes (files and members can be large)."""
    return len(rows) >= FILES_PER_UNIT or sum(len(r["data"] or b"") for r in rows) >= TABLE_BYTES


def _read_files(unit: Unit, max_bytes: int | None) -> Iterator[pa.Table]:
    fs, _ = storage.fsspec_fs(unit.items[0])
    rows = []
    for uri, rel, label in zip(unit.items, unit.rel_paths, unit.labels):
        path = storage.fsspec_fs(uri)[1]
        try:
            info = fs.info(path)  # through links; a file that became a pipe after planning would block this task
            error = SPECIAL_REASON if info["type"] != "file" else _too_big(int(info["size"]), max_bytes)
            rows.append(_record(uri, rel, label, None if error else fs.cat_file(path), error))
        except Exception as exc:  # noqa: BLE001 - an unreadable file is a reported reject
            rows.append(_record(uri, rel, label, error=f"unreadable file: {one_line(exc)}"))
        if _full(rows):
            yield _table(rows)
            rows = []
    if rows:
        yield _table(rows)


def _read_zip(unit: Unit, max_bytes: int | None) -> Iterator[pa.Table]:
    fs, path = storage.fsspec_fs(unit.uri)
    rows: list[dict] = []
    done = 0
    try:
        with fs.open(path, "rb") as f, zipfile.ZipFile(f) as zf:
            for name, rel, label in zip(unit.items, unit.rel_paths, unit.labels):
                source = f"{unit.uri}!{name}"
                try:
                    error = _too_big(zf.getinfo(name).file_size, max_bytes)
                    rows.append(_record(source, rel, label, None if error else zf.read(name), error))
                except Exception as exc:  # noqa: BLE001 - bad CRC, bad compression, encrypted member
                    rows.append(_record(source, rel, label, error=f"unreadable archive member: {one_line(exc)}"))
                done += 1
                if _full(rows):
                    yield _table(rows)
                    rows = []
    except Exception as exc:  # noqa: BLE001 - archive vanished or broke between plan and read: the rest are reported
        for name, rel, label in list(zip(unit.items, unit.rel_paths, unit.labels))[done:]:
            rows.append(_record(f"{unit.uri}!{name}", rel, label, error=f"unreadable archive: {one_line(exc)}"))
    if rows:
        yield _table(rows)


def _read_tar(unit: Unit, max_bytes: int | None) -> Iterator[pa.Table]:
    fs, path = storage.fsspec_fs(unit.uri)
    wanted = {name: (rel, label) for name, rel, label in zip(unit.items, unit.rel_paths, unit.labels)}
    passed: collections.Counter = collections.Counter()  # copies of each name met so far
    seen: set[str] = set()
    rows: list[dict] = []
    error_all = None
    try:
        with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tf:
            for member in tf:
                if member.name not in wanted or member.isdir():
                    continue
                passed[member.name] += 1  # counted as planning counted them: every member but folders
                if passed[member.name] != unit.copies.get(member.name, 1) or not member.isfile():
                    continue  # an earlier copy (the planned last is read), or no longer a file: reported below
                seen.add(member.name)
                rel, label = wanted[member.name]
                source = f"{unit.uri}!{member.name}"
                error = _too_big(member.size, max_bytes)
                try:
                    data = None if error else tf.extractfile(member).read()
                    rows.append(_record(source, rel, label, data, error))
                except Exception as exc:  # noqa: BLE001
                    rows.append(_record(source, rel, label, error=f"unreadable archive member: {one_line(exc)}"))
                if _full(rows):
                    yield _table(rows)
                    rows = []
    except Exception as exc:  # noqa: BLE001 - truncated or corrupt stream: the rest are reported below
        error_all = f"unreadable archive: {one_line(exc)}"
    for name, (rel, label) in wanted.items():
        if name not in seen:
            rows.append(_record(f"{unit.uri}!{name}", rel, label, error=error_all or "archive member missing on read"))
    if rows:
        yield _table(rows)


IMAGE_COLUMNS = ("image", "bytes", "data", "content", "img")


def _strings(column: pa.ChunkedArray) -> list[str | None]:
    """A name column as strings (a user's Parquet may hold ints there); nulls stay None."""
    return [None if v is None else str(v) for v in column.to_pylist()]


def row_names(unit: Unit) -> tuple[list[str], list[str]]:
    """(source, rel_path) of a Parquet unit's rows by position: "file#row"."""
    return [f"{unit.uri}#{i}" for i in range(unit.rows)], [f"{unit.rel_paths[0]}#{i}" for i in range(unit.rows)]


def parquet_names(unit: Unit, pf: pq.ParquetFile) -> tuple[str | None, list[str], list[str]]:
    """(image column or None, source, rel_path) of every row of a Parquet unit, reading only the name columns.

    A row's source is its `source` value when that column names every row once (a prepared dataset's original
    paths, a job's outputs); otherwise, as when `source` is a provenance tag ("wikiart" on every row), it is
    "file#row", so no two inputs ever share an identity (and an output name)."""
    schema = pf.schema_arrow
    binary = [n for n in schema.names
              if pa.types.is_binary(schema.field(n).type) or pa.types.is_large_binary(schema.field(n).type)]
    image_col = next((c for c in IMAGE_COLUMNS if c in binary), binary[0] if binary else None)
    rel0 = unit.rel_paths[0]
    by_row, rel_by_row = row_names(unit)
    if image_col is None:
        return None, by_row, rel_by_row
    cols = [c for c in ("source", "rel_path") if c in schema.names]
    table = pf.read(columns=cols) if cols else None
    named = _strings(table.column("source")) if "source" in cols else []
    unique = bool(named) and None not in named and len(set(named)) == len(named)
    srcs = named if unique else by_row
    if "rel_path" in cols:
        rels = [r or rel_by_row[i] for i, r in enumerate(_strings(table.column("rel_path")))]
    elif named:
        rels = [posixpath.basename(n) if n else rel_by_row[i] for i, n in enumerate(named)]
    else:
        stem = posixpath.splitext(rel0)[0]
        rels = [f"{stem}/{i:08d}" for i in range(unit.rows)]
    return image_col, srcs, rels


def _read_parquet(unit: Unit, max_bytes: int | None) -> Iterator[pa.Table]:
    fs, path = storage.arrow_fs(unit.uri)
    srcs, rels = row_names(unit)  # until the name columns are read (a file that cannot be opened keeps these)
    rows: list[dict] = []
    done = 0  # rows with a record
    try:
        with fs.open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            image_col, srcs, rels = parquet_names(unit, pf)
            if image_col is None:
                yield _table([_record(s, r, None, error="parquet file has no image-bytes column")
                              for s, r in zip(srcs, rels)])
                return
            has_labels = unit.label_column and "label_name" in pf.schema_arrow.names
            cols = [image_col] + (["label_name"] if has_labels else [])
            for batch in pf.iter_batches(batch_size=PARQUET_ROWS_PER_READ, columns=cols):
                blobs = batch.column(image_col)
                sizes = pc.binary_length(blobs).to_pylist()  # checked in Arrow: an over-cap row never becomes bytes
                labels = _strings(batch.column("label_name")) if has_labels else [None] * len(sizes)
                for i, (size, label) in enumerate(zip(sizes, labels)):
                    error = _too_big(size or 0, max_bytes)
                    blob = None if error else blobs[i].as_py()
                    rows.append(_record(srcs[done], rels[done], label or unit.folder_label, blob, error))
                    done += 1
                    if _full(rows):
                        yield _table(rows)
                        rows = []
    except Exception as exc:  # noqa: BLE001 - corrupt pages or a file changed since planning: the rest are reported
        reason = f"unreadable parquet file: {one_line(exc)}"
        rows.extend(_record(srcs[i], rels[i], None, error=reason) for i in range(done, unit.rows))
    if rows:
        yield _table(rows)


def _read_idx(unit: Unit, max_bytes: int | None) -> Iterator[pa.Table]:
    """Each idx image as a binary PGM (P5) file: the raw grey bytes behind a tiny header, decoded by the image gate."""
    rows: list[dict] = []
    done = 0
    try:
        with _idx_open(unit.uri) as f:
            count, height, width = _idx_header(f, 3)
            size = height * width
            error = _too_big(size, max_bytes)
            pgm_header = b"P5\n%d %d\n255\n" % (width, height)
            position = 16
            for item, rel, label in zip(unit.items, unit.rel_paths, unit.labels):
                index = int(item)
                if index >= count:
                    raise IdxError(f"image {index} is past the end: the file now holds {count} images")
                if position != 16 + index * size:  # units are contiguous runs: one seek at the start
                    position = 16 + index * size
                    f.seek(position)
                pixels = f.read(size)
                position += len(pixels)
                if len(pixels) < size:
                    raise IdxError(f"truncated at image {index}")
                rows.append(_record(f"{unit.uri}#{index}", rel, label, None if error else pgm_header + pixels, error))
                done += 1
                if len(rows) >= IDX_IMAGES_PER_TABLE:
                    yield _table(rows)
                    rows = []
    except Exception as exc:  # noqa: BLE001 - changed or broken since planning: the rest are reported
        reason = _idx_reason(exc)
        for item, rel, label in list(zip(unit.items, unit.rel_paths, unit.labels))[done:]:
            rows.append(_record(f"{unit.uri}#{item}", rel, label, error=reason))
    if rows:
        yield _table(rows)


# ---------------------------------------------------------------- the names of every planned input


def input_names(plan: Plan) -> list[tuple[str, str]]:
    """(source, rel_path) of every input in the plan, as `read_unit` names them (no image bytes read).

    The source is an input's identity everywhere (a job's output name and resume, an index's rows, prepare's
    dedup), so two inputs with one source are a UserError, raised before any work: e.g. a prepared dataset's rows
    keep their raw files' paths, and a SRC holding both the raw files and the dataset would read each picture twice.
    """
    pairs: list[tuple[str, str]] = [(f["source"], f["source"]) for f in plan.failures]
    for unit in plan.units:
        if unit.kind == "files":
            pairs.extend(zip(unit.items, unit.rel_paths))
        elif unit.kind == "parquet":
            pairs.extend(_parquet_input_names(unit))
        else:  # archive members and idx images
            prefix = item_prefix(unit)
            pairs.extend((prefix + item, rel) for item, rel in zip(unit.items, unit.rel_paths))
    counts = collections.Counter(source for source, _ in pairs)
    repeated = next((source for source, n in counts.items() if n > 1), None)
    if repeated is not None:
        raise UserError(f"two inputs are both named {repeated} (a prepared dataset's rows keep the names of the files "
                        f"they came from): give sources that hold each picture once")
    return pairs


def item_prefix(unit: Unit) -> str:
    """What goes before an item to make its source: nothing for a file, "archive!" for a member, "idx#" for an image."""
    return {"files": "", "idx": f"{unit.uri}#"}.get(unit.kind, f"{unit.uri}!")


def _parquet_input_names(unit: Unit) -> list[tuple[str, str]]:
    """The names `_read_parquet` gives the unit's rows (the same function), reading only name columns."""
    fs, path = storage.arrow_fs(unit.uri)
    try:
        with fs.open_input_file(path) as f:
            _, srcs, rels = parquet_names(unit, pq.ParquetFile(f))
    except Exception:  # noqa: BLE001 - a damaged file: the reader reports each of its rows under these names
        srcs, rels = row_names(unit)
    return list(zip(srcs, rels))


# ---------------------------------------------------------------- the Ray Dataset


def read_images(sources: list[str], labels: str | None = None, max_bytes: int | None = None, the_plan: Plan | None = None):
    """(Ray Dataset of RAW_SCHEMA records, Plan) for images under `sources`, streamed and read in parallel."""
    import ray

    from genart import runtime

    runtime.streaming_context()
    the_plan = the_plan or plan(sources, labels)
    failed = _table([_record(f["source"], f["source"], None, error=f["reason"]) for f in the_plan.failures])
    if not the_plan.units:  # only planning failures: still report them as records
        return ray.data.from_arrow(failed), the_plan

    def read_batch(batch: pa.Table) -> Iterator[pa.Table]:
        for row in batch.to_pylist():
            yield from read_unit(Unit(**row), max_bytes)

    # Each unit travels inside its own row (not in the closure), so tasks stay small however long the plan.
    rows = [dataclasses.asdict(u) for u in the_plan.units]
    ds = ray.data.from_items(rows, override_num_blocks=len(rows))
    ds = ds.map_batches(read_batch, batch_size=1, batch_format="pyarrow")
    if the_plan.failures:
        ds = ds.union(ray.data.from_arrow(failed))
    return ds, the_plan
