"""Local paths and `s3://` URIs behind one API: the fsspec and pyarrow filesystems every other module uses, and the
one rule for names that become a folder or URL segment (`is_safe_name`).

S3 endpoint and credentials come from the standard AWS variables (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION), so MinIO and other S3-compatible stores need no genart setting.
pyarrow's S3FileSystem ignores AWS_ENDPOINT_URL, so both filesystems are built here and nowhere else.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import posixpath
import re
import shutil
import stat
import tempfile
import uuid
from pathlib import Path
from typing import Iterator
from urllib.parse import urlparse

import fsspec
import pyarrow.fs as pafs

from genart.errors import UserError, one_line

# A name a user gives that becomes one folder (run, checkpoint, served style) or one URL segment (served model):
# letters, digits, '.', '_', '-', starting with a letter or digit, so it can never be a path, '.' or '..'.
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
SAFE_NAME_RULE = "use letters, digits, '.', '_' or '-' (no '/'), starting with a letter or digit"
RUN_NAME_MAX = 100  # characters in a run folder name (run.name, workflow candidates)
MODEL_NAME_MAX = 64  # characters in a served model name, which is also a Serve deployment name


def is_safe_name(name: object, max_chars: int | None = None) -> bool:
    """True for a SAFE_NAME of at most `max_chars` characters (None: any length)."""
    # fullmatch: `$` alone also matches before a final newline ("run\n")
    return isinstance(name, str) and bool(SAFE_NAME.fullmatch(name)) and (max_chars is None or len(name) <= max_chars)


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


# A URI scheme (two characters or more, so a Windows drive letter is none): anything but s3:// is refused rather than
# read as a local folder named "gs:" (results silently written to ./gs:/bucket/...).
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):/")


def _checked(uri: str) -> str:
    uri = str(uri)
    scheme = _SCHEME.match(uri)
    if scheme and not is_s3(uri):
        hint = "; write s3://bucket/key (lower case, two slashes)" if scheme.group(1).lower() == "s3" else ""
        raise UserError(f"{uri}: genart reads and writes local paths and s3:// URIs only{hint}")
    return uri


def absolute(uri: str, start: str | None = None) -> str:
    """A local path made absolute (Ray Train workers and Data actors run in folders of their own); s3:// unchanged.
    `start`: the folder a relative path starts from (default: this process's working folder)."""
    if is_s3(uri):
        return uri
    path = os.path.expanduser(uri)
    return os.path.abspath(os.path.join(start, path) if start else path)


def within(uri: str, folder: str) -> bool:
    """Whether `uri` is `folder` or lies below it, on the same store."""
    if is_s3(uri) != is_s3(folder):
        return False
    path, root = _path(_checked(uri)).rstrip("/"), _path(_checked(folder)).rstrip("/")
    return path == root or path.startswith(root + "/")


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a local path or URI (always with '/')."""
    uri = _checked(uri)
    if is_s3(uri):
        return posixpath.join(uri.rstrip("/"), *parts)
    return str(Path(uri).joinpath(*parts))


def _endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def _region() -> str:
    return os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1"


def _path(uri: str) -> str:
    """A checked URI as its filesystems name it: "bucket/key" for s3://, an absolute path for a local one."""
    return uri[len("s3://") :].rstrip("/") if is_s3(uri) else os.path.abspath(os.path.expanduser(uri))


def fsspec_fs(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path) for fsspec: `s3://bucket/key` -> (s3fs, "bucket/key"); local -> (file, abs path)."""
    uri = _checked(uri)
    if is_s3(uri):
        import s3fs

        kwargs = {"client_kwargs": {"region_name": _region()}}
        if _endpoint():
            kwargs["endpoint_url"] = _endpoint()
        # skip_instance_cache: the endpoint may change between calls (tests, multiple stores).
        return s3fs.S3FileSystem(skip_instance_cache=True, **kwargs), _path(uri)
    return fsspec.filesystem("file"), _path(uri)


def arrow_fs(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for pyarrow and Ray Data (`filesystem=`) and Ray Train (`storage_filesystem=`)."""
    uri = _checked(uri)
    if is_s3(uri):
        kwargs: dict = {"region": _region()}
        endpoint = _endpoint()
        if endpoint:
            parsed = urlparse(endpoint)
            kwargs["endpoint_override"] = parsed.netloc or parsed.path
            kwargs["scheme"] = parsed.scheme or "https"
        return pafs.S3FileSystem(**kwargs), _path(uri)
    return pafs.LocalFileSystem(), _path(uri)


def exists(uri: str) -> bool:
    fs, path = fsspec_fs(uri)
    return fs.exists(path)


def isdir(uri: str) -> bool:
    fs, path = fsspec_fs(uri)
    return fs.isdir(path)


def read_bytes(uri: str) -> bytes:
    fs, path = fsspec_fs(uri)
    try:
        return fs.cat_file(path)
    except FileNotFoundError:
        raise UserError(f"not found: {uri}") from None


def sha256(uri: str) -> str:
    """sha256 hex of a local file or s3:// object, read in 1 MiB chunks (weights files can be large).

    Raises FileNotFoundError, so the caller can say which file was expected.
    """
    fs, path = fsspec_fs(uri)
    digest = hashlib.sha256()
    with fs.open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole object at once: a local temp file renamed into place, or one S3 PUT.

    Either way a reader never sees a partial file (fsspec's streaming writer commits on error).
    """
    fs, path = fsspec_fs(uri)
    if is_s3(uri):
        fs.pipe_file(path, data)
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:  # disk full, Ctrl-C: no temp file left beside the outputs
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode())


def read_text(uri: str) -> str:
    return read_bytes(uri).decode()


def makedirs(uri: str) -> None:
    if not is_s3(uri):  # S3 has no folders
        os.makedirs(fsspec_fs(uri)[1], exist_ok=True)


def remove(uri: str, recursive: bool = True) -> None:
    fs, path = fsspec_fs(uri)
    if fs.exists(path):
        fs.rm(path, recursive=recursive)


def move(src: str, dst: str) -> None:
    """Rename within one store (a copy then delete on S3)."""
    fs, src_path = fsspec_fs(src)
    _, dst_path = fsspec_fs(dst)
    fs.mv(src_path, dst_path)


def listdir(uri: str) -> list[str]:
    """Immediate children as full URIs (empty if the folder does not exist)."""
    fs, path = fsspec_fs(uri)
    if not fs.exists(path):
        return []
    return sorted(_to_uri(uri, p) for p in fs.ls(path, detail=False) if p.rstrip("/") != path)


def find(uri: str, specials: list[str] | None = None) -> list[tuple[str, int]]:
    """Every file below `uri`, recursively, as (uri, size), sorted by uri. Local pipes, sockets and devices are not
    files (reading a pipe waits forever for a writer): they go to `specials` when it is given, else are left out."""
    fs, path = fsspec_fs(uri)
    found = fs.find(path, detail=True)
    on_s3 = is_s3(uri)
    files = []
    for p, info in found.items():
        kind = info.get("type")
        if kind == "directory" or (on_s3 and _folder_marker(p)):
            continue
        # fsspec lists a symlink as "other" too: only what is not a file through its links is special
        if kind == "other" and special(p):
            if specials is not None:
                specials.append(p)
            continue
        files.append((_to_uri(uri, p), int(info.get("size") or 0)))
    return sorted(files)


def special(uri: str) -> bool:
    """Whether local `uri` is there but, through its links, is no file to read: a pipe, socket or device, or a link to
    a folder. (A broken link is not special: reading it says it is missing.)"""
    if is_s3(uri):
        return False
    try:
        return not stat.S_ISREG(os.stat(_path(uri)).st_mode)
    except OSError:
        return False


def _folder_marker(key: str) -> bool:
    """An S3 key that stands for a folder, not a file: the AWS console's "Create folder" writes `name/`, Hadoop's
    S3 connectors `name_$folder$`. s3fs lists both as files."""
    return key.endswith(("/", "_$folder$"))


def _to_uri(like: str, path: str) -> str:
    return f"s3://{path}" if is_s3(like) else path


def relative(root: str, uri: str) -> str:
    """`uri` relative to `root`, with '/' separators. (Paths only: a listing of a million S3 keys built an S3
    filesystem client for each, 0.5 ms a key.)"""
    root_path = _path(_checked(root)).rstrip("/")
    path = _path(_checked(uri))
    if path == root_path:
        return posixpath.basename(path)
    return path[len(root_path) + 1 :] if path.startswith(root_path + "/") else path


def check_writable(uri: str) -> None:
    """Fail early with one clear line if `uri` cannot be written (before any work starts)."""
    probe = join(uri, f".genart-probe-{uuid.uuid4().hex[:8]}")
    try:
        write_bytes(probe, b"")
        remove(probe)
    except Exception as exc:  # noqa: BLE001 - any failure here means "not writable", said once
        raise UserError(f"cannot write to {uri}: {one_line(exc)}") from None


@contextlib.contextmanager
def local_dir(uri: str) -> Iterator[str]:
    """A local folder holding the contents of `uri`: the folder itself, or a temporary download of an S3 prefix."""
    if not is_s3(uri):
        yield fsspec_fs(uri)[1]
        return
    fs, path = fsspec_fs(uri)
    tmp = tempfile.mkdtemp(prefix="genart-")
    try:
        fs.get(path + "/", tmp + "/", recursive=True)
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def upload_dir(local: str, uri: str) -> None:
    """Copy a local folder's contents to `uri` (local or S3)."""
    if is_s3(uri):
        fs, path = fsspec_fs(uri)
        fs.put(local.rstrip("/") + "/", path + "/", recursive=True)
    else:
        shutil.copytree(local, fsspec_fs(uri)[1], dirs_exist_ok=True)
