"""What the throughput benches share for `--device {cpu,cuda}`: the flag, the no-GPU exit, and a background sampler of
GPU utilisation and memory per phase (pynvml if importable, else `nvidia-smi -lms 200`; plus this process's
`torch.cuda.max_memory_allocated`).

    gpu.device_arg(parser)                     # adds --device; after parse_args: gpu.require(args.device)
    phases = gpu.Phases(args.device)
    with phases("batched"):
        run()
    result["gpu"] = phases.summaries           # {} on a CPU
Utilisation and memory.used are device-wide (every process: Ray actors and replicas included), summed / averaged
over the visible GPUs; max_memory_allocated covers only tensors of this process (the in-process sides).
"""

from __future__ import annotations

import contextlib
import shutil
import statistics
import subprocess
import sys
import threading
import time

DEVICES = ("cpu", "cuda")
NVIDIA_SMI = ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits"]


def device_arg(parser) -> None:
    parser.add_argument("--device", choices=DEVICES, default="cpu",
                        help="where genart's side runs (cuda: reports GPU utilisation and peak memory per phase)")


def require(device: str) -> None:
    """Exit 1 with one line on stderr when --device cuda is asked for on a machine torch sees no GPU on."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        print(f"{sys.argv[0]}: --device cuda: torch sees no CUDA GPU here (torch.cuda.is_available() is false); "
              "run on a GPU machine or use --device cpu", file=sys.stderr)
        sys.exit(1)


def parse_smi_lines(lines: list[str]) -> tuple[float, float] | None:
    """One sample of `nvidia-smi --query-gpu=utilization.gpu,memory.used` (a line per GPU, "util, MiB") ->
    (mean utilisation %, summed memory used MiB); None if no line parses ("[N/A]" on some boards)."""
    values = []
    for line in lines:
        try:
            util, mem = (float(v) for v in line.split(","))
        except ValueError:
            continue
        values.append((util, mem))
    if not values:
        return None
    return statistics.fmean(u for u, _ in values), sum(m for _, m in values)


class GpuSampler:
    """Samples (utilisation %, memory used MiB) every `interval_s` in the background between start() and stop().

    Without a GPU (torch.cuda.is_available() false) it samples nothing and `summary()` is None, so a CPU run
    pays no thread and no subprocess.
    """

    def __init__(self, interval_s: float = 0.2):
        self.interval_s = interval_s
        self.samples: list[tuple[float, float]] = []
        self.source: str | None = None  # "pynvml" | "nvidia-smi" | None (no GPU, or neither available)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._proc: subprocess.Popen | None = None
        self._cuda = False

    def start(self) -> "GpuSampler":
        import torch

        self._cuda = torch.cuda.is_available()
        if not self._cuda:
            return self
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        try:
            import pynvml

            pynvml.nvmlInit()
            handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
            self.source = "pynvml"
            self._thread = threading.Thread(target=self._nvml_loop, args=(pynvml, handles), daemon=True)
        except Exception:  # noqa: BLE001 - not installed, or no NVML driver: fall back to the CLI
            if shutil.which("nvidia-smi"):
                listing = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
                                         capture_output=True, text=True, timeout=30).stdout
                self.source = "nvidia-smi"
                self._proc = subprocess.Popen(NVIDIA_SMI + ["-lms", str(int(self.interval_s * 1000))],
                                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
                gpus = max(1, len(listing.split()))
                self._thread = threading.Thread(target=self._smi_loop, args=(gpus,), daemon=True)
        if self._thread is not None:
            self._thread.start()
        return self

    def _nvml_loop(self, pynvml, handles) -> None:
        while not self._stop.is_set():
            lines = []
            for h in handles:
                util = pynvml.nvmlDeviceGetUtilizationRates(h).gpu
                mem = pynvml.nvmlDeviceGetMemoryInfo(h).used / 2**20
                lines.append(f"{util}, {mem}")
            sample = parse_smi_lines(lines)
            if sample is not None:
                self.samples.append(sample)
            self._stop.wait(self.interval_s)

    def _smi_loop(self, gpus: int) -> None:
        # nvidia-smi -lms prints one line per GPU per sample (every GPU of the machine, whatever CUDA_VISIBLE_DEVICES)
        pending: list[str] = []
        for line in self._proc.stdout:
            pending.append(line.strip())
            if len(pending) >= gpus:
                sample = parse_smi_lines(pending)
                if sample is not None:
                    self.samples.append(sample)
                pending = []

    def stop(self) -> None:
        self._stop.set()
        if self._proc is not None:
            self._proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=5)
            if self._proc.poll() is None:
                self._proc.kill()
                self._proc.wait()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._cuda:
            import torch

            torch.cuda.synchronize()
            self.peak_allocated_mb = torch.cuda.max_memory_allocated() / 2**20

    def summary(self) -> dict | None:
        """None without a GPU; else utilisation mean / max %, peak memory used (device-wide) and allocated (here)."""
        if not self._cuda:
            return None
        utils = [u for u, _ in self.samples]
        return {
            "source": self.source, "samples": len(self.samples),
            "utilization_mean_pct": round(statistics.fmean(utils), 1) if utils else None,
            "utilization_max_pct": round(max(utils), 1) if utils else None,
            "memory_used_peak_mb": round(max(m for _, m in self.samples), 1) if self.samples else None,
            "max_memory_allocated_mb": round(getattr(self, "peak_allocated_mb", 0.0), 1),
        }

    def __enter__(self) -> "GpuSampler":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class Phases:
    """`with phases("name"):` samples the GPU during that block; `summaries` maps each phase name to its
    GpuSampler.summary() (samples of a phase run several times are pooled). Empty on a CPU run."""

    def __init__(self, device: str):
        self.device = device
        self.summaries: dict[str, dict] = {}
        self._samplers: dict[str, list[GpuSampler]] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        if self.device != "cuda":
            yield
            return
        sampler = GpuSampler()
        with sampler:
            yield
        self._samplers.setdefault(name, []).append(sampler)
        self.summaries[name] = _pooled(self._samplers[name])


def _pooled(samplers: list[GpuSampler]) -> dict | None:
    if len(samplers) == 1:
        return samplers[0].summary()
    pooled = GpuSampler()
    pooled._cuda, pooled.source = samplers[0]._cuda, samplers[0].source
    pooled.samples = [s for sampler in samplers for s in sampler.samples]
    pooled.peak_allocated_mb = max(getattr(s, "peak_allocated_mb", 0.0) for s in samplers)
    return pooled.summary()


def now() -> float:
    """perf_counter after the GPU has finished queued work (a no-op without one): for timing GPU phases."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter()
