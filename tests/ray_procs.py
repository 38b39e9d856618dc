"""Find the processes of one Ray session from /proc (no psutil here): a process tree, or every process whose command
line names a private temp dir (Ray's raylet, GCS, agents and workers all carry their session dir on it)."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the name (state, ppid, ...; starttime is [19]); None if it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()  # the name in (...) may hold spaces
    except OSError:
        return None


def _ppid(pid: int) -> int | None:
    fields = _stat(pid)
    return int(fields[1]) if fields else None


def _alive(pid: int) -> bool:
    """Running (not a zombie waiting for its parent's wait())."""
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"


def _start_time(pid: int) -> str | None:
    fields = _stat(pid)
    return fields[19] if fields else None


class Seen:
    """Processes a test has seen, each by its pid and start time. Teardown kills the ones still alive: minutes later
    the kernel may have given a dead one's pid to another process (or a thread of one; /proc/TID/stat reads too),
    which must never be killed or reported as a leftover."""

    def __init__(self) -> None:
        self._started: dict[int, str] = {}

    def add(self, pids: set[int]) -> set[int]:
        for pid in pids:
            started = _start_time(pid)
            if started is not None:
                self._started[pid] = started  # found in this session's tree or temp dir now: this process
        return pids

    def alive(self) -> set[int]:
        """The seen processes still running: same pid, same start time, not a zombie."""
        return {pid for pid, started in self._started.items() if _start_time(pid) == started and _alive(pid)}


def descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            parent = _ppid(int(entry.name))
            if parent is not None:
                children.setdefault(parent, []).append(int(entry.name))
    found, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def mentioning(text: str) -> set[int]:
    """Live pids (not this one) whose command line contains `text`."""
    pids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if text.encode() in (entry / "cmdline").read_bytes():
                    pids.add(int(entry.name))
            except OSError:
                pass
    return {pid for pid in pids if _alive(pid)}


def describe(pids: set[int]) -> list[str]:
    out = []
    for pid in sorted(pids):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")[:120].decode()
            out.append(f"{pid}: {command}")
        except OSError:
            out.append(f"{pid}: (gone)")
    return out


def kill_all(pids: set[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def stop_group(proc: subprocess.Popen) -> None:
    """Stop a process started with start_new_session=True (a `ray start --block` head or node) and its group:
    SIGTERM and a minute to shut down, then SIGKILL."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
