"""Connect to a Ray cluster (`--address` / RAY_ADDRESS) or start the embedded local one, sized for the machine.

On a small machine a TorchTrainer whose workers hold every CPU starves Ray Data's read tasks forever
(seen with `num_cpus=2` + 2 workers of 1 CPU on a 2-core box). The local instance therefore gets more
logical CPUs than physical cores, and `check_training_fits` refuses a worker layout that leaves Data nothing.
`quiet_logs` is the one place that decides what Ray may print; `free_port` finds a loopback port.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
from contextlib import contextmanager
from typing import Iterator

import click

from genart.errors import UserError, one_line

# Logical CPUs the embedded instance advertises beyond the physical ones: room for Data tasks, Serve
# proxies and controllers beside training workers. Oversubscribing is fine; they are mostly I/O bound.
EXTRA_LOCAL_CPUS = 2
MIN_LOCAL_CPUS = 4
# Image rows are large: Ray Data blocks of at most this size keep its memory budget meaningful.
TARGET_BLOCK_BYTES = 16 << 20
# CPUs that training must leave free for Ray Data's read/decode tasks.
DATA_RESERVED_CPUS = 1.0


def local_cpus() -> int:
    return max(MIN_LOCAL_CPUS, (os.cpu_count() or 1) + EXTRA_LOCAL_CPUS)


_embedded = False  # whether init started the local instance (one machine: no node of it can be lost)


def is_embedded() -> bool:
    """Whether this process runs on the embedded local Ray that init started, not on a cluster it joined."""
    return _embedded


def init(address: str | None = None, *, num_cpus: int | None = None, quiet: bool = True) -> None:
    """Make sure this process is connected to Ray: the given cluster, RAY_ADDRESS, or a new local instance."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    runtime_env = {"env_vars": {"RAY_TRAIN_V2_ENABLED": "1"}}
    if quiet:
        runtime_env["worker_process_setup_hook"] = "genart.runtime.quiet_logs"
        quiet_logs()
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    kwargs = dict(logging_level=logging.WARNING if quiet else logging.INFO, runtime_env=runtime_env)
    if address:
        if address.startswith(("http://", "https://")):  # how Ray's docs set RAY_ADDRESS for job submission
            raise UserError(f"Ray address {address}: that is a Jobs API (dashboard) URL, which `genart submit` "
                            f"takes; here give the head's GCS address, HOST:6379 (check RAY_ADDRESS)")
        try:
            ray.init(address=address, **kwargs)
        except (ConnectionError, ValueError, RuntimeError) as exc:  # unreachable, malformed (`head:6379x`), refused
            raise UserError(f"cannot connect to Ray at {address}: {one_line(exc, with_type=False)}") from None
    else:
        # Ray Train's preemption watcher polls for node drains (spot instances, autoscaler scale-down). The embedded
        # instance is this machine alone, which no one drains: it would only cost an actor process per run and
        # print Ray's core_worker error about its restartable constructor arguments (ray-project/ray#53727).
        runtime_env["env_vars"]["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = "0"
        # address="local": never attach by accident to some other cluster found in /tmp/ray.
        ray.init(address="local", num_cpus=num_cpus or local_cpus(), include_dashboard=False, **kwargs)
        global _embedded
        _embedded = True
    stop_on_sigterm()


def free_port() -> int:
    """A loopback TCP port nothing listens on right now (the OS picks it): for a local Serve, Ray or DDP rendezvous
    in tests and benches."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Terminated(KeyboardInterrupt):
    """SIGTERM (Kubernetes, systemd, `docker stop`) raised as Ctrl-C is, so every command's cleanup path runs."""


def stop_on_sigterm() -> None:
    """Replace the SIGTERM handlers ray.init installs (Python's kills the embedded node mid-call and exits 1; the core
    worker's C++ one aborts with SIGABRT and leaves DashboardAgent/RuntimeEnvAgent behind) with one that raises
    Terminated in the main thread. A SIGTERM while ray.init itself runs (a few seconds) still meets Ray's."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, raise_terminated)


def raise_terminated(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the cleanup short
    raise Terminated()


def shutdown() -> None:
    """Disconnect; an embedded local Ray stops every process it started (raylet, GCS, agents, workers)."""
    import ray

    global _embedded
    if ray.is_initialized():
        ray.shutdown()
    _embedded = False


@contextmanager
def command_exits(prog: str) -> Iterator[None]:
    """How `genart` and the workflows end on what is not a bug: a UserError (bad config, missing data,
    unreachable cluster) is one line on stderr and exit 2; after Ctrl-C or SIGTERM (`Terminated`) Ray is stopped
    and the exit is 130 / 143, as a shell's, so a preempted command (Kubernetes, systemd) reads as stopped, not
    failed. Other exceptions keep their traceback."""
    try:
        yield
    except UserError as exc:
        click.echo(f"{prog}: error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt as exc:
        shutdown()
        terminated = isinstance(exc, Terminated)
        click.echo(f"{prog}: stopped by {'SIGTERM' if terminated else 'Ctrl-C'}; run the same command again to "
                   "resume", err=True)
        sys.exit(143 if terminated else 130)


# Ray Data's console lines that say nothing to a genart user (genart prints its own progress and summaries).
_NOISE = ("Progress bars disabled", "Progress bars for operators disabled", "execution finished in",
          "Starting execution of Dataset", "Execution plan of Dataset", "Full logs are in", "Data sink ",
          "Estimated parquet ")  # the V1 Parquet reader's sizing notes, two per read
# The tail of the path-named logger behind Ray Train's "Reporting training result ..." lines.
REPORT_LOGGER_SUFFIX = "/train/v2/_internal/execution/context.py"


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(text in record.getMessage() for text in _NOISE)


_DROP_NOISE = _DropNoise()  # one instance, so calling quiet_logs again adds no second filter

# Ray Train's controller, in its own process; it logs every error of its control loop with a traceback.
CONTROLLER_LOGGER = "ray.train.v2._internal.execution.controller.controller"


class _WaitingForWorkers(logging.Filter):
    """Ray Train V2 waits RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S (60 s) for its workers' placement group, then logs
    WorkerGroupStartupTimeoutError with a 30-line traceback and tries again, without limit: a run that waits for
    nodes or for other jobs' CPUs printed a traceback a minute and looked crashed. It is one line here instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if type(error).__name__ == "WorkerGroupStartupTimeoutError":
            workers = getattr(error, "num_workers", "the")
            record.msg = (f"waiting for resources: {workers} training workers could not be placed yet (the cluster is "
                          f"full or short of nodes); Ray Train keeps trying and starts when they fit. Ctrl-C stops; "
                          f"running the command again resumes from the latest checkpoint")
            record.args, record.exc_info, record.exc_text = (), None, None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


_WAITING_FOR_WORKERS = _WaitingForWorkers()


def quiet_logs(*datasets, training: bool = False) -> None:
    """Keep the console for genart's own progress lines: everything genart tells Ray not to print is here.

    Every process (the driver, and every Ray worker via a setup hook): Ray Data logs each dataset execution (several
    per training epoch) to the console; those lines stay in its log file (session_*/logs/ray-data). Train V2's
    placement-group cleaner polls the state API, which is absent without a dashboard, and warns on every poll; a
    dead controller's group still goes when the cluster stops. Its controller's wait for workers is one line, not a
    traceback a minute (_WaitingForWorkers).
    training=True (each Train worker, as its loop starts): no Ray Data INFO lines and no per-report Train lines.
    `datasets` (the splits handed to Train): no progress bars or execution banners, which every worker would print.
    """
    import warnings

    import ray.data  # noqa: F401 - configures Ray Data's loggers, which are adjusted below

    # Raised inside Ray Train's own DatasetManager (Ray 2.60), about an option genart does not set.
    warnings.filterwarnings("ignore", message=r".*ExecutionOptions\.exclude_resources. is deprecated")

    for handler in logging.getLogger("ray.data").handlers:
        if type(handler).__name__ != "SessionFileHandler":  # the console, not the session log file
            handler.addFilter(_DROP_NOISE)
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)
    logging.getLogger(CONTROLLER_LOGGER).addFilter(_WAITING_FOR_WORKERS)
    if training:
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        # Batches of a cached (materialized) split are read-only views of the object store; nothing writes into them.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        # Ray 2.60 logs every report at INFO through a logger named by its source file's path, which
        # RunConfig(logging_config=...) does not reach; found by that name, without importing Ray's private module.
        for name in list(logging.Logger.manager.loggerDict):
            if name.endswith(REPORT_LOGGER_SUFFIX):
                logging.getLogger(name).setLevel(logging.WARNING)
    for ds in datasets:
        ds.context.enable_progress_bars = False
        ds.context.print_on_execution_start = False


def cluster_cpus() -> float:
    import ray

    return float(ray.cluster_resources().get("CPU", 0.0))


def check_training_fits(num_workers: int, cpus_per_worker: float, use_gpu: bool = False) -> None:
    """Refuse a worker layout that would take every CPU and deadlock Ray Data (see module docstring)."""
    total = cluster_cpus()
    wanted = num_workers * cpus_per_worker
    if total and wanted > total - DATA_RESERVED_CPUS:
        raise UserError(
            f"scaling: {num_workers} workers x {cpus_per_worker} CPU = {wanted:g} CPUs, but the cluster has {total:g} "
            f"and Ray Data needs {DATA_RESERVED_CPUS:g} free; lower scaling.num_workers or scaling.cpus_per_worker"
        )


def streaming_context() -> None:
    """Tune this driver's Ray Data context for image pipelines: small blocks, so memory stays bounded."""
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.target_max_block_size = min(ctx.target_max_block_size or TARGET_BLOCK_BYTES, TARGET_BLOCK_BYTES)
    # Parquet through Ray Data's V1 reader. Ray 2.60's default (DataSourceV2) starts 32 FooterReader actors on every
    # read to index the files' footers: 5-9 s on 2 cores for a one-shard split, paid again every epoch by a streamed
    # split; V1 reads the footers in its own read tasks (0.2 s for the same read). genart's shards are few and large.
    ctx.use_datasource_v2 = False
