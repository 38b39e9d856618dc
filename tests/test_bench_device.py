"""The GPU paths as far as a machine without a GPU can check them: every throughput bench's `--device cuda` exits 1
with one line, bench/gpu.py's sampler starts and stops cleanly and reports nothing, `train.amp: auto` is fp32 on a
CPU (bit-identical training steps), and InferenceSetup on a CPU is the fp32 setup the actors always had."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from genart.models.tiny import tiny_config
from helpers import one_thread  # noqa: F401  (autouse: one torch thread in this module)

ROOT = Path(__file__).resolve().parents[1]
BENCHES = ["bench_stylize.py", "bench_batching.py", "bench_train.py", "bench_index.py", "bench_serve.py"]
NO_GPU = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}  # no GPU, even on a machine with one


@pytest.mark.parametrize("bench", BENCHES)
def test_device_cuda_without_a_gpu_exits_1_with_one_line(bench):
    done = subprocess.run([sys.executable, str(ROOT / "bench" / bench), "--device", "cuda"], env=NO_GPU,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, (done.returncode, done.stderr[-2000:])
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "--device cuda" in lines[0] and "no CUDA GPU" in lines[0], done.stderr


def test_gpu_sampler_without_a_gpu_starts_and_stops_cleanly():
    script = """
import sys, threading
sys.path.insert(0, "bench")
import gpu
threads = threading.active_count()
sampler = gpu.GpuSampler(interval_s=0.05).start()
sampler.stop()
phases = gpu.Phases("cuda")
with phases("work"):
    sum(range(1000))
cpu = gpu.Phases("cpu")
with cpu("work"):
    pass
print(sampler.summary(), sampler.source, sampler.samples, phases.summaries, cpu.summaries, threading.active_count() - threads)
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=NO_GPU, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["None", "None", "[]", "{'work':", "None}", "{}", "0"], done.stdout


def test_nvidia_smi_samples_parse():
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu

    assert gpu.parse_smi_lines(["37, 1024", "63, 2048"]) == (50.0, 3072.0)  # mean utilisation, summed memory
    assert gpu.parse_smi_lines(["[N/A], [N/A]", "80, 512"]) == (80.0, 512.0)
    assert gpu.parse_smi_lines(["", "[N/A], [N/A]"]) is None


def test_amp_auto_is_the_default_and_fp32_on_a_cpu():
    from genart.config import validate
    from genart.errors import UserError
    from genart.models.training import Precision, amp_dtype
    from genart.train.config import TrainSection

    assert TrainSection().amp == "auto"
    assert TrainSection(amp=False).amp is False and TrainSection(amp=True).amp is True
    for amp in ("auto", True, False):
        assert amp_dtype(amp, "cpu") is None
        precision = Precision(amp, "cpu")
        assert not precision.enabled and not precision.scaled and precision.dtype is None
    assert amp_dtype(False, "cuda") is None  # amp off stays fp32 on a GPU
    with pytest.raises(UserError, match=r"amp: .*use auto .*true or false \(got .bf16.\)"):
        validate(TrainSection, {"amp": "bf16"}, source="--set train.amp=bf16")


def test_cpu_training_steps_are_bit_identical_under_amp_auto():
    """The same DCGAN steps with train.amp auto and with the old fp32 default give the very same weights."""
    from genart import models
    from genart.models.training import Precision

    fam, cfg = models.REGISTRY["dcgan"], tiny_config("dcgan")

    def weights(precision):
        torch.manual_seed(0)
        nets = fam.build(cfg, 16, 0)
        opts = fam.optimizers(cfg, {k: nets[k] for k in fam.trainable()})
        g = torch.Generator().manual_seed(1)
        for step in range(2):
            batch = {"image": torch.rand(4, 3, 16, 16, generator=g) * 2 - 1, "label": torch.full((4,), -1)}
            fam.train_step(cfg, nets, opts, batch, step, precision)
        return [p.detach().clone() for k in fam.trainable() for p in nets[k].parameters()]

    before, auto = weights(Precision()), weights(Precision("auto", "cpu"))
    assert len(before) == len(auto) > 0
    assert all(torch.equal(a, b) for a, b in zip(before, auto))


def test_inference_setup_on_a_cpu_is_fp32_and_matches_plain_no_grad(tmp_path):
    from genart import models
    from genart.models.family import InferenceSetup
    from genart.models.tiny import tiny_checkpoint

    cpu = InferenceSetup()
    assert cpu.describe() == {"device": "cpu", "precision": "float32", "channels_last": False, "cudnn_benchmark": False}
    assert InferenceSetup(autocast=True).describe()["precision"] == "bfloat16"
    model = cpu.place(models.load(tiny_checkpoint(str(tmp_path / "s"), "style", 16, seed=3, channels=4,
                                                  num_res_blocks=1)))
    x = torch.rand(2, 3, 20, 24, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = model.stylize(x)
    with cpu.inference():
        assert torch.is_inference_mode_enabled()
        placed = model.stylize(cpu.to_device(x))
    assert torch.equal(plain, placed)
