"""What every streaming batch job (stylize, score, generate, index) shares around its Ray Data chain: the data
context it is built in (small blocks, no Ray progress bars), the loop that drains its status rows, and the stall
watchdog that turns a job Ray can no longer finish into one clear error instead of a silent hang."""

from __future__ import annotations

import contextlib
import ctypes
import queue
import threading
from collections.abc import Iterable, Iterator

from genart.errors import UserError
from genart.infer import output

# Ray Data coalesces a task's output into blocks of up to 128 MiB by default: a whole read unit (64 images) or
# actor call would then move downstream at once, and decoding, the model and writing would take turns instead of
# overlapping. Small blocks keep a few images in flight between the stages (and the memory bound tight).
BLOCK_BYTES = 1 << 20

# Long enough for a cold cluster to start GPU nodes and load models before the first output, short enough that a
# stuck job does not hold a cluster overnight.
STALL_TIMEOUT_S = 1800.0


@contextlib.contextmanager
def pipeline_context():
    """Start/connect Ray; datasets built inside the block get small blocks (each Dataset copies the context)."""
    import ray

    from genart import runtime

    runtime.init()
    ctx = ray.data.DataContext.get_current()
    saved = ctx.target_max_block_size, ctx.enable_progress_bars
    # genart's own line (output.Progress) counts images end to end; Ray's per-operator bars would fight it
    ctx.target_max_block_size, ctx.enable_progress_bars = BLOCK_BYTES, False
    try:
        yield
    finally:
        ctx.target_max_block_size, ctx.enable_progress_bars = saved


class JobStalled(UserError):
    """A job that received nothing for its stall timeout. Seen when a node was lost mid-job and Ray never recovered
    the work in flight (ray issues 53727, 47043): the job would otherwise wait forever."""


class _Stop(BaseException):
    """Raised inside a pump thread to stop it (see watched)."""


# How long a consumer that leaves early waits for its pump to stop: Ray Data's iterators notice an exception within
# 0.5 s (they poll), then shut their executor down (cancelling tasks, killing the job's actors).
STOP_WAIT_S = 20.0


def watched(batches: Iterable, stall_s: float, what: str, then: str) -> Iterator:
    """`batches`, or JobStalled once none has arrived for `stall_s` seconds (0: wait forever); `then` tells the user
    what to do next. A blocked Ray Data iterator cannot be timed out from its own thread, so a pump thread iterates it;
    when the consumer leaves early (a stall, an error, Ctrl-C) the pump gets an exception raised inside it, which
    unwinds Ray Data's iterator as Ctrl-C would: the executor shuts down instead of running on behind an error."""
    if not stall_s:
        yield from batches
        return
    arrived: queue.Queue = queue.Queue()  # (True, batch), or (False, None) at the end, or (False, the exception)

    def pump() -> None:
        try:
            for batch in batches:
                arrived.put((True, batch))
            arrived.put((False, None))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which raises it
            arrived.put((False, e))

    thread = threading.Thread(target=pump, name=f"genart-{what}", daemon=True)
    thread.start()
    ended = False
    try:
        while not ended:
            try:
                is_batch, value = arrived.get(timeout=stall_s)
            except queue.Empty:
                raise JobStalled(f"{what}: no output for {stall_s:g} s, so the job was stopped (Ray could not go on, "
                                 f"e.g. after losing a node it could not recover work from); {then}") from None
            if is_batch:
                yield value
                continue
            ended = True
            if value is not None:
                raise value
    finally:
        if not ended and thread.is_alive():
            # CPython's way to raise in another thread; it lands at the pump's next bytecode, within Ray's polls
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(_Stop))
        thread.join(STOP_WAIT_S)


RESUME_HINT = "what is written is kept: run the same command with --resume to finish it"


def drain(ds, tally: output.Tally, progress: output.Progress, stall_s: float, then: str = RESUME_HINT) -> None:
    """Run the pipeline to its end: the driver receives only the small status rows, counts them, shows progress.
    JobStalled (saying `then`) when no row arrives for `stall_s` seconds; what is written stays."""
    rows = watched(ds.iter_batches(batch_size=None, batch_format="pyarrow"), stall_s, progress.command, then)
    try:
        for status in rows:
            tally.add(status)
            progress.update(tally, status.num_rows)
    finally:
        rows.close()  # now, not when the error's traceback lets go of it: Ray must not run on behind the error
        progress.close()
