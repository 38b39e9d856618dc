"""What every streaming batch job (stylize, score, generate, index) shares around its Ray Data chain: the data
context it is built in (small blocks, no Ray progress bars), the loop that drains its status rows, and the stall
watchdog that turns a job Ray can no longer finish into one clear error instead of a silent hang."""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Iterable, Iterator

from genart.errors import UserError
from genart.infer import output

# Ray Data coalesces a task's output into blocks of up to 128 MiB by default: a whole read unit (64 images) or
# actor call would then move downstream at once, and decoding, the model and writing would take turns instead of
# overlapping. Small blocks keep a few images in flight between the stages (and the memory bound tight).
BLOCK_BYTES = 1 << 20

# On a cluster, no output for this long after the first means the job is stuck. Half an hour: a batch of big photos
# on CPUs, or an autoscaler bringing back a node, can keep a healthy job quiet for many minutes.
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


# How long a consumer that leaves early waits for its reader thread to end. Ray Data's iterator ends at once when its
# execution is shut down; a read blocked elsewhere (fetching a lost object Ray is rebuilding) may not, and the reader,
# a daemon thread, is then left behind.
STOP_WAIT_S = 5.0


def stall_limit(stall_s: float | None) -> float:
    """A job's stall timeout: as given, else STALL_TIMEOUT_S on a cluster and 0 (never) on the embedded Ray, where
    no node can be lost and a quiet job is only a slow one."""
    from genart import runtime

    if stall_s is not None:
        return stall_s
    return 0.0 if runtime.is_embedded() else STALL_TIMEOUT_S


def watched(batches: Iterable, stall_s: float, what: str, then: str, stop: Callable[[], None]) -> Iterator:
    """`batches`, or JobStalled once none has arrived for `stall_s` seconds since the last (0 or inf: wait forever;
    before the first, a job may wait for resources or load its models: never stopped); `then` says what to do next.

    A blocked Ray Data iterator cannot be timed out from its own thread, so a reader thread iterates it. When the
    consumer leaves early (a stall, an error, Ctrl-C), `stop()` ends the production (execution_stopper: Ray Data's
    executor shuts down, cancelling its tasks and killing its actors), so the reader's blocked read returns and it
    stops instead of running on behind an error."""
    if not stall_s or stall_s > threading.TIMEOUT_MAX:
        yield from batches
        return
    arrived: queue.Queue = queue.Queue()  # (True, batch), or (False, None) at the end, or (False, the exception)
    gone = threading.Event()

    def read() -> None:
        it = iter(batches)
        try:
            for batch in it:
                if gone.is_set():
                    break
                arrived.put((True, batch))
            arrived.put((False, None))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which raises it
            arrived.put((False, e))
        finally:
            getattr(it, "close", lambda: None)()

    reader = threading.Thread(target=read, name=f"genart-{what}", daemon=True)
    ended = False
    try:
        reader.start()
        timeout = None  # until the first batch
        while not ended:
            try:
                is_batch, value = arrived.get(timeout=timeout)
            except queue.Empty:
                raise JobStalled(f"{what}: no output for {stall_s:g} s, so the job was stopped (Ray could not go on: "
                                 f"a node lost with work Ray could not recover, or no resources left for the job); "
                                 f"{then}") from None
            timeout = stall_s
            if is_batch:
                yield value
                continue
            ended = True
            if value is not None:
                raise value
    finally:
        if not ended and reader.ident is not None:
            gone.set()
            with contextlib.suppress(Exception):  # the error that made the consumer leave is the one to report
                stop()
            reader.join(STOP_WAIT_S)


def execution_stopper(ds) -> Callable[[], None]:
    """What stops `ds`'s running execution from another thread: its streaming executor's shutdown, as Ray Data's own
    blocking calls end theirs (Dataset._synchronize_progress_bar; the executor is kept from the first output on)."""

    def stop() -> None:
        executor = getattr(ds, "_current_executor", None)
        if executor is not None:
            executor.shutdown(force=True)

    return stop


def resume_hint(resumed: bool) -> str:
    """What a stopped batch job tells its user to do: run it again (with --resume unless it was given: the
    workflows always resume), or give it more time."""
    again = "again" if resumed else "with --resume"
    return (f"what is written is kept: run the same command {again} to finish it (if one batch can take that long, "
            f"with a longer stall timeout)")


@contextlib.contextmanager
def job_batches(ds, batch_format: str, stall_s: float | None, what: str, then: str) -> Iterator[Iterator]:
    """`ds`'s output batches, whole, under the stall watchdog (stall_limit(stall_s); JobStalled says `then`), and
    closed when the block is left: now, not when an error's traceback lets go of them, so Ray does not run on."""
    batches = watched(ds.iter_batches(batch_size=None, batch_format=batch_format), stall_limit(stall_s), what, then,
                      execution_stopper(ds))
    try:
        yield batches
    finally:
        batches.close()


def drain(ds, tally: output.Tally, progress: output.Progress, stall_s: float | None, then: str) -> None:
    """Run the pipeline to its end: the driver receives only the small status rows, counts them, shows progress.
    JobStalled (saying `then`) when no row arrives for stall_limit(stall_s) seconds; what is written stays."""
    try:
        with job_batches(ds, "pyarrow", stall_s, progress.command, then) as rows:
            for status in rows:
                tally.add(status)
                progress.update(tally, status.num_rows)
    finally:
        progress.close()
