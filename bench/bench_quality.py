"""Sample quality of genart's DCGAN and VAE (and VQ-VAE) beside the pytorch/examples reference algorithms, and style-transfer quality.

    .venv/bin/python bench/bench_quality.py                      # the quickstart budget: dcgan 3000, vae 600, style 100 steps, batch 64, 1000 images
    .venv/bin/python bench/bench_quality.py --steps-dcgan 1500 --steps-vae 1500 --steps-style 1500 --out results/bench_quality_1500
    .venv/bin/python bench/bench_quality.py --steps-dcgan 20 --steps-vae 20 --steps-style 10 --num-generated 200 --images 300  # smoke, ~2.5 min
(--only dcgan,vae skips the style network; --only style runs it alone; --only vae,vqvae adds the VQ-VAE family, 600 +
4,000 prior steps, beside the same reference VAE trained as many steps: ~25 min more.)

Same data (genart.data.synth -> genart prepare; the references read the same prepared train split), same steps, same
global batch. genart trains through its real entry point (workflows/configs/*.yaml + train(), Ray Train, 1 worker);
the references are plain PyTorch loops in this process, written after pytorch/examples dcgan/main.py and vae/main.py
scaled to 3x32x32 (see RefGenerator / RefVAE). Both sides get `--threads` CPU threads (Ray sets a worker's
OMP_NUM_THREADS from scaling.cpus_per_worker) and niceness 15 (Ray's workers'). Each side samples as its users get:
genart = `genart.models.load(run).sample(seeds)` (EMA generator, eval mode; one checkpoint, at the last step, with its
configs' data.augment); reference DCGAN = netG in train mode (batch-statistics BatchNorm) as the example's grids.
A judge CNN defined here (not genart's critic) is trained on the real train images; in its penultimate features:
FID to the real train split, the share of samples it recognises (max softmax >= RECOGNISED_PROB) and genre coverage
(rarest_genre_ratio = min over genres of sample share / data share). Names carry the sample count (fid1k_judge).
The judge must put every picture in some genre and files colour mottle as stripes, so stripes_banded_share counts,
of the samples it names stripes, those drawn as parallel bands (structure-tensor coherence; real stripes: 1.0).
Goals: FID ratio genart/reference <= 0.8, rarest_genre_ratio >= 0.6, style edge_correlation >= 0.35.
Prints one JSON object on stdout (everything else, Ray's worker output included, goes to stderr); grids go to --out.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from genart.train.augment import blur  # noqa: E402  (the judge's training blur; genart's critic trains with the same)
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
CONFIGS = os.path.join(ROOT, "workflows", "configs")

RECOGNISED_PROB = 0.9  # a sample is "recognised" when the judge's top softmax probability is at least this
JUDGE_NOISE = 0.1  # the judge's training noise, max sigma in [0, 1] pixel units
JUDGE_BLUR = 1.0  # the judge's training blur, max Gaussian sigma in pixels at 32 px (scaled with the side)
BANDED_COHERENCE = 0.5  # rendered stripes score >= 0.9 (nine in ten), discs, bars and noise fields ~0.1-0.2 (medians)
GOALS = {"fid_ratio_max": 0.8, "rarest_genre_ratio_min": 0.6, "edge_correlation_min": 0.35}
GRID_SAMPLES = 64
STYLIZE_MAX_SIDE = 256  # quickstart's stylize_max_side
CONTENT_SIZE, CONTENT_CROP = 48, 0  # quickstart's content_size, content_crop


def log(msg: str) -> None:
    print(f"[bench_quality] {msg}", file=sys.stderr, flush=True)


def count_name(n: int) -> str:
    """1000 -> '1k', 200 -> '200' (stylegan2-ada's fid50k style)."""
    return f"{n // 1000}k" if n % 1000 == 0 else str(n)


# ---------------------------------------------------------------- data


def prepare_data(root: str, num_images: int, content_size: int) -> tuple[str, str]:
    from genart import assets
    from genart.data.prepare import PrepareOptions, prepare
    from genart.data.synth import make_synth

    make_synth(f"{root}/raw/synth", num=num_images, size=32, seed=0)
    prepare([f"{root}/raw/synth"], f"{root}/synth", PrepareOptions(size=32, val_fraction=0.1), progress=False)
    opts = PrepareOptions(size=content_size, labels="none", val_fraction=0.1)
    prepare([str(assets.PAINTINGS), str(assets.PHOTOS)], f"{root}/paintings", opts, progress=False)
    return f"{root}/synth", f"{root}/paintings"


def read_split(data: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The prepared Parquet's `split` rows -> images (N, 3, 32, 32) in [0, 1], labels (N,) int64, sorted by id."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from genart.data.read import parquet_files

    rows = []
    for path in sorted(parquet_files(data)):
        table = pq.read_table(path, columns=["id", "image", "label", "split"])
        rows.extend(table.filter(pc.equal(table["split"], split)).to_pylist())
    rows.sort(key=lambda r: r["id"])
    images = np.stack([np.asarray(Image.open(io.BytesIO(r["image"])).convert("RGB"), np.float32) / 255.0 for r in rows])
    return torch.from_numpy(images.transpose(0, 3, 1, 2).copy()), torch.tensor([r["label"] for r in rows])


def batches(num: int, batch_size: int, steps: int, seed: int):
    """Index batches of exactly batch_size for `steps` steps: a fresh permutation each epoch (DataLoader shuffle=True,
    drop_last, so every step sees the same batch size genart's loop does)."""
    gen, step = torch.Generator().manual_seed(seed), 0
    while True:
        perm = torch.randperm(num, generator=gen)
        for start in range(0, num - batch_size + 1, batch_size):
            if step == steps:
                return
            yield perm[start : start + batch_size]
            step += 1


# ---------------------------------------------------------------- the judge (independent of genart's critic)


class Judge(nn.Module):
    """(B, 3, 32, 32) in [0, 1] -> genre logits; `features` = the pooled penultimate layer (B, 128)."""

    def __init__(self, num_classes: int):
        super().__init__()
        layers, cin = [], 3
        for cout in (32, 64, 128):  # 32 -> 16 -> 8 -> 4 px
            layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(True), nn.MaxPool2d(2)]
            cin = cout
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())  # (B, 128)
        self.head = nn.Linear(cin, num_classes)

    def features(self, x01: torch.Tensor) -> torch.Tensor:
        return self.body(x01 * 2 - 1)

    def forward(self, x01: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x01))


def train_judge(x: torch.Tensor, y: torch.Tensor, num_classes: int, steps: int, batch_size: int) -> Judge:
    torch.manual_seed(1)
    judge = Judge(num_classes)
    opt = torch.optim.Adam(judge.parameters(), lr=2e-3)
    judge.train()
    for idx in batches(len(x), min(batch_size, len(x)), steps, seed=1):
        xb = x[idx]
        flip = torch.rand(len(xb)) < 0.5  # horizontal flips: the genres are mirror-symmetric
        xb = torch.where(flip[:, None, None, None], xb.flip(3), xb)
        # pixel noise of a random strength (0..JUDGE_NOISE) on each image: a judge trained on clean pictures alone
        # filed anything grainy (as every generator's samples are) as "stripes" (val accuracy 0.98 clean, 0.59 at
        # sigma 0.05); it must judge shapes, not grain
        sigma = torch.rand(len(xb), 1, 1, 1) * JUDGE_NOISE
        xb = (xb + sigma * torch.randn(xb.shape)).clamp(0, 1)
        # and a blur of a random strength (0..JUDGE_BLUR px): trained on sharp pictures alone, it filed real circles
        # blurred by 0.8 px (still plainly circles to a person) as "noise", 100 % of them; a genre is a shape, and
        # how soft its edges are is for the FID to weigh, not the genre
        xb = blur(xb, torch.rand(len(xb)) * JUDGE_BLUR * xb.shape[-1] / 32)  # the same share of the side at 16 px
        loss = F.cross_entropy(judge(xb), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return judge.eval()


@torch.no_grad()
def judge_outputs(judge: Judge, x01: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """-> penultimate features (N, 128) float64, softmax probabilities (N, C)."""
    feats = torch.cat([judge.features(x01[i : i + 256].float()) for i in range(0, len(x01), 256)])
    return feats.double().numpy(), F.softmax(judge.head(feats), dim=1).numpy()


def quality(judge: Judge, samples: torch.Tensor, real_feats: np.ndarray, data_share: np.ndarray,
            genres: list[str]) -> dict:
    """FID to the real features, recognised share and genre coverage of `samples` (N, 3, 32, 32) in [0, 1]."""
    from genart.evaluate.metrics import fid

    n = count_name(len(samples))
    samples = (samples.float().clamp(0, 1) * 255).round() / 255  # 8-bit pictures, as saved PNGs and the real side are
    feats, probs = judge_outputs(judge, samples)
    share = np.bincount(probs.argmax(1), minlength=len(genres)) / len(samples)
    return {
        f"fid{n}_judge": round(fid(real_feats, feats), 3),
        f"recognised_share{n}_judge": round(float((probs.max(1) >= RECOGNISED_PROB).mean()), 4),
        f"rarest_genre_ratio{n}_judge": round(float((share / data_share).min()), 4),
        f"genre_share{n}_judge": {g: round(float(s), 4) for g, s in zip(genres, share)},
        f"stripes_banded_share{n}_judge": banded_share(samples, probs, genres),
    }


def coherence(x01: torch.Tensor) -> torch.Tensor:
    """How much every edge of an image runs one way: the coherence of its colour structure tensor (Di Zenzo 1986),
    (B, 3, H, W) in [0, 1] -> (B,) in [0, 1]. ~1 for parallel bands (and linear blends), ~0.1 for discs, crossing
    bars, noise fields and colour mottle."""
    sobel = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]) / 8
    b, c, h, w = x01.shape
    g = F.conv2d(x01.reshape(b * c, 1, h, w).float(), torch.stack([sobel, sobel.T])[:, None]).reshape(b, c, 2, h - 2, w - 2)
    gx, gy = g[:, :, 0], g[:, :, 1]
    jxx, jyy, jxy = (gx * gx).sum((1, 2, 3)), (gy * gy).sum((1, 2, 3)), (gx * gy).sum((1, 2, 3))
    return torch.sqrt((jxx - jyy) ** 2 + 4 * jxy**2) / (jxx + jyy).clamp(min=1e-8)


def banded_share(x01: torch.Tensor, probs: np.ndarray, genres: list[str]) -> float | None:
    """Of the images the judge names stripes, the share drawn as parallel bands (coherence >= BANDED_COHERENCE).
    The judge must put every picture in some genre, and it files patchy colour mottle as stripes (a person would not):
    this counts what a person sees in the stripes row. None when no image is named stripes."""
    named = probs.argmax(1) == genres.index("stripes")
    if not named.any():
        return None
    return round(float((coherence(x01[torch.from_numpy(named)]) >= BANDED_COHERENCE).float().mean()), 4)


# ---------------------------------------------------------------- reference DCGAN (pytorch/examples dcgan/main.py at 32 px)

NZ, NGF, NDF = 100, 64, 64


def ref_weights_init(m: nn.Module) -> None:
    classname = m.__class__.__name__
    if classname.find("Conv") != -1:
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif classname.find("BatchNorm") != -1:
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


class RefGenerator(nn.Module):
    """The example's netG with its first (ngf*8, 4x4 -> 8x8) stage dropped: z (B, nz, 1, 1) -> (B, 3, 32, 32) in [-1, 1]."""

    def __init__(self):
        super().__init__()
        self.main = nn.Sequential(
            nn.ConvTranspose2d(NZ, NGF * 4, 4, 1, 0, bias=False), nn.BatchNorm2d(NGF * 4), nn.ReLU(True),  # 4x4
            nn.ConvTranspose2d(NGF * 4, NGF * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(NGF * 2), nn.ReLU(True),  # 8x8
            nn.ConvTranspose2d(NGF * 2, NGF, 4, 2, 1, bias=False), nn.BatchNorm2d(NGF), nn.ReLU(True),  # 16x16
            nn.ConvTranspose2d(NGF, 3, 4, 2, 1, bias=False), nn.Tanh(),  # 32x32
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.main(z)


class RefDiscriminator(nn.Module):
    """The example's netD with its last (ndf*8) stage dropped: (B, 3, 32, 32) -> probability (B,)."""

    def __init__(self):
        super().__init__()
        self.main = nn.Sequential(
            nn.Conv2d(3, NDF, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, inplace=True),  # 16x16
            nn.Conv2d(NDF, NDF * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(NDF * 2), nn.LeakyReLU(0.2, inplace=True),  # 8x8
            nn.Conv2d(NDF * 2, NDF * 4, 4, 2, 1, bias=False), nn.BatchNorm2d(NDF * 4), nn.LeakyReLU(0.2, inplace=True),  # 4x4
            nn.Conv2d(NDF * 4, 1, 4, 1, 0, bias=False), nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x).view(-1, 1).squeeze(1)


def train_ref_dcgan(x01: torch.Tensor, steps: int, batch_size: int, num_generated: int) -> tuple[torch.Tensor, float]:
    """The example's loop step for step (BCE, Adam 2e-4 / beta1 0.5); samples drawn in train mode as the example does
    (BatchNorm on batch statistics, batches of batch_size). -> samples (N, 3, 32, 32) in [0, 1], training seconds."""
    torch.manual_seed(0)
    net_g, net_d = RefGenerator(), RefDiscriminator()
    net_g.apply(ref_weights_init)
    net_d.apply(ref_weights_init)
    criterion = nn.BCELoss()
    opt_d = torch.optim.Adam(net_d.parameters(), lr=2e-4, betas=(0.5, 0.999))
    opt_g = torch.optim.Adam(net_g.parameters(), lr=2e-4, betas=(0.5, 0.999))
    data = x01 * 2 - 1  # transforms.Normalize((0.5,) * 3, (0.5,) * 3)
    started = time.perf_counter()
    for idx in batches(len(data), batch_size, steps, seed=0):
        real = data[idx]
        net_d.zero_grad()
        label = torch.full((len(real),), 1.0)
        err_d_real = criterion(net_d(real), label)
        err_d_real.backward()
        fake = net_g(torch.randn(len(real), NZ, 1, 1))
        label.fill_(0.0)
        err_d_fake = criterion(net_d(fake.detach()), label)
        err_d_fake.backward()
        opt_d.step()
        net_g.zero_grad()
        label.fill_(1.0)  # fake labels are real for the generator cost
        criterion(net_d(fake), label).backward()
        opt_g.step()
    seconds = time.perf_counter() - started
    gen = torch.Generator().manual_seed(12345)
    with torch.no_grad():  # net_g stays in train mode, as in the example's fixed-noise samples
        z = torch.randn(num_generated, NZ, 1, 1, generator=gen)
        out = torch.cat([net_g(z[i : i + batch_size]) for i in range(0, num_generated, batch_size)])
    return ((out + 1) / 2).clamp(0, 1), seconds


# ---------------------------------------------------------------- reference VAE (pytorch/examples vae/main.py at 3x32x32)

PIXELS = 3 * 32 * 32


class RefVAE(nn.Module):
    """The example's MLP VAE with 784 inputs scaled to 3*32*32: x -> 400 -> (mu, logvar) 20 -> 400 -> sigmoid x_hat."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc21, self.fc22 = nn.Linear(PIXELS, 400), nn.Linear(400, 20), nn.Linear(400, 20)
        self.fc3, self.fc4 = nn.Linear(20, 400), nn.Linear(400, PIXELS)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h1 = F.relu(self.fc1(x))
        return self.fc21(h1), self.fc22(h1)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.fc4(F.relu(self.fc3(z))))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mu, logvar = self.encode(x.view(-1, PIXELS))
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        return self.decode(z), mu, logvar


def train_ref_vae(x01: torch.Tensor, steps: int, batch_size: int, num_generated: int) -> tuple[torch.Tensor, float]:
    """BCE summed over pixels and batch + KL, Adam 1e-3; samples = decode(N(0, I)). -> (N, 3, 32, 32) in [0, 1], seconds."""
    torch.manual_seed(1)
    model = RefVAE()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    started = time.perf_counter()
    for idx in batches(len(x01), batch_size, steps, seed=0):
        data = x01[idx]
        recon, mu, logvar = model(data)
        bce = F.binary_cross_entropy(recon, data.view(-1, PIXELS), reduction="sum")
        kld = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
        opt.zero_grad()
        (bce + kld).backward()
        opt.step()
    seconds = time.perf_counter() - started
    gen = torch.Generator().manual_seed(12345)
    with torch.no_grad():
        out = model.decode(torch.randn(num_generated, 20, generator=gen)).view(-1, 3, 32, 32)
    return out, seconds


# ---------------------------------------------------------------- genart, through its real entry point


def train_genart(family: str, data: str, storage: str, steps: int, overrides: list[str]) -> tuple[object, dict, float]:
    """workflows/configs/<family>.yaml + overrides -> genart.train.trainer.train -> genart.models.load(run_dir)."""
    from genart import models
    from genart.train.config import load_config
    from genart.train.trainer import train

    cfg = load_config(os.path.join(CONFIGS, f"{family}.yaml"), [
        f"data.path={data}", f"run.storage={storage}", f"run.name={family}", f"train.max_steps={steps}",
        # one checkpoint, at the end: best.json then names the final weights, the same step count as the reference
        f"train.checkpoint_every_steps={steps}", f"train.log_every_steps={max(1, steps // 10)}",
        "scaling.num_workers=1", "eval.every_checkpoints=0", *overrides])
    started = time.perf_counter()
    summary = train(cfg, echo=log)
    seconds = time.perf_counter() - started
    times = {"train_wall_s": round(seconds, 1), "fit_s": summary["seconds"],
             "step_s": round(step_seconds(summary["run_dir"], cfg.data.batch_size * cfg.scaling.num_workers), 1)}
    return models.load(summary["run_dir"]), summary, times


def step_seconds(run_dir: str, batch_size: int) -> float:
    """Seconds of genart's training windows in metrics.jsonl: optimizer steps plus each log row's ray.train.report,
    without start-up, validation or checkpoints (the closest match to the reference loop's time)."""
    from genart.train import outputs

    total, last = 0.0, 0
    for row in outputs.read_metrics(run_dir):
        if row.get("images_per_second"):
            total += (row["step"] - last) * batch_size / row["images_per_second"]
        last = row["step"]
    return total


def sample_grid(x: torch.Tensor) -> Image.Image:
    """The first GRID_SAMPLES images of x (N, 3, H, W) in [0, 1] as a square grid, enlarged (nearest) to >= 256 px."""
    from genart.models.sampling import make_grid

    grid = make_grid(x[:GRID_SAMPLES], nrow=int(math.ceil(math.sqrt(min(len(x), GRID_SAMPLES)))))
    scale = max(1, 256 // grid.width)
    return grid.resize((grid.width * scale, grid.height * scale), Image.Resampling.NEAREST)


def side_by_side(left: torch.Tensor, right: torch.Tensor, titles: tuple[str, str], path: str) -> str:
    grids = [sample_grid(x) for x in (left, right)]
    gap, head = 16, 18
    sheet = Image.new("RGB", (sum(g.width for g in grids) + gap, max(g.height for g in grids) + head), "white")
    draw = ImageDraw.Draw(sheet)
    x = 0
    for grid, title in zip(grids, titles):
        sheet.paste(grid, (x, head))
        draw.text((x + 2, 3), title, fill="black")
        x += grid.width + gap
    sheet.save(path)
    return path


def compare_family(family: str, args, data: str, runs: str, train_x: torch.Tensor, judge: Judge, real_feats: np.ndarray,
                   data_share: np.ndarray, genres: list[str]) -> dict:
    batch = args.batch_size  # x 1 worker = genart's global batch (the quickstart's 2 workers x 32 make 64)
    steps = {"dcgan": args.steps_dcgan, "vae": args.steps_vae, "vqvae": args.steps_vqvae}[family]
    extra = []
    if family == "vqvae":  # the prior's learning-rate decay spans the steps left after the VQ-VAE's
        from genart.train.config import load_config

        start = load_config(os.path.join(CONFIGS, "vqvae.yaml"), []).model.prior_start_step
        extra = [f"model.prior_steps={max(1, steps - start)}"]
    log(f"{family}: genart, {steps} steps, batch {batch}")
    model, summary, times = train_genart(family, data, runs, steps, ["data.image_size=32", f"data.batch_size={batch}",
                                                                      f"scaling.cpus_per_worker={args.threads}", *extra,
                                                                      *args.overrides])
    seeds = list(range(args.num_generated))

    def draw(guidance: float | None = None) -> torch.Tensor:  # seeds 0..N-1 in chunks of 250
        return torch.cat([model.sample(seeds[i : i + 250], guidance=guidance) for i in range(0, len(seeds), 250)])

    ours = draw()
    g = quality(judge, ours, real_feats, data_share, genres)
    if family == "vqvae" and args.guidance:  # the same weights at each classifier-free guidance scale
        g["by_guidance"] = {}
        for scale in args.guidance:
            guided = draw(scale)
            g["by_guidance"][str(scale)] = quality(judge, guided, real_feats, data_share, genres)
            sample_grid(guided).save(os.path.join(args.out, f"vqvae_guidance_{scale:g}.png"))
    if args.no_reference:  # tuning genart alone: its figures and grid, no ratios
        grid = os.path.join(args.out, f"{family}_genart.png")
        sample_grid(ours).save(grid)
        return {"steps": steps, "global_batch": batch, "genart": {**g, **times, "final_metrics": summary["final_metrics"]},
                "grid": grid}
    log(f"{family}: reference (pytorch/examples), {steps} steps, batch {batch}")
    trainer = train_ref_dcgan if family == "dcgan" else train_ref_vae  # the VQ-VAE's reference: the example's VAE
    theirs, ref_s = trainer(train_x, steps, batch, args.num_generated)
    r = quality(judge, theirs, real_feats, data_share, genres)
    n = count_name(args.num_generated)
    fid_key, rec_key = f"fid{n}_judge", f"recognised_share{n}_judge"
    titles = (f"genart {family} (.sample: {'EMA G, eval mode' if family == 'dcgan' else 'its prior'})",
              f"pytorch/examples {'dcgan' if family == 'dcgan' else 'vae'} ({'train-mode BN' if family == 'dcgan' else 'decode N(0, I)'})")
    grid = side_by_side(ours, theirs, titles,
                        os.path.join(args.out, f"{family}_genart_vs_reference.png"))
    return {
        "steps": steps, "global_batch": batch,
        "genart": {**g, **times, "checkpoint": model.meta.get("checkpoint"),
                   "final_metrics": summary["final_metrics"]},
        "reference": {**r, "train_wall_s": round(ref_s, 1)},
        f"{fid_key}_ratio": round(g[fid_key] / r[fid_key], 3) if r[fid_key] > 0 else None,
        f"{rec_key}_ratio": round(g[rec_key] / r[rec_key], 3) if r[rec_key] > 0 else None,
        f"{rec_key}_difference": round(g[rec_key] - r[rec_key], 4),
        # genart's whole train() call (Ray Train start-up included) and its optimizer steps alone, over the reference loop
        "train_wall_ratio": round(times["train_wall_s"] / ref_s, 2) if ref_s > 0 else None,
        "step_time_ratio": round(times["step_s"] / ref_s, 2) if ref_s > 0 else None,
        "grid": grid,
    }


# ---------------------------------------------------------------- style transfer


def archive_images() -> list[tuple[str, Image.Image]]:
    """The quickstart's to_stylize archive: the first two files of every folder of the shipped photos and paintings."""
    from genart import assets
    from genart.data.images import cap_side, decode_image

    out = []
    for folder in (assets.PHOTOS, assets.PAINTINGS):
        for root, _, files in sorted(os.walk(folder)):
            for name in sorted(files)[:2]:
                full = os.path.join(root, name)
                with open(full, "rb") as f:
                    out.append((os.path.relpath(full, folder.parent), cap_side(decode_image(f.read()), STYLIZE_MAX_SIDE)))
    return out


def pairs_sheet(pairs: list[tuple[torch.Tensor, torch.Tensor]], path: str, height: int = 128, per_row: int = 7) -> str:
    """Content above stylized, one column per image, `per_row` columns per band."""
    from genart.data.images import from_tensor01

    tiles = []
    for content, out in pairs:
        a, b = from_tensor01(torch.stack([content, out]))
        w = max(1, round(a.width * height / a.height))
        tiles.append((a.resize((w, height)), b.resize((w, height))))
    bands = [tiles[i : i + per_row] for i in range(0, len(tiles), per_row)]
    width = max(sum(t[0].width + 4 for t in band) for band in bands)
    sheet = Image.new("RGB", (width, len(bands) * (2 * height + 12)), "white")
    for row, band in enumerate(bands):
        x, y = 0, row * (2 * height + 12)
        for a, b in band:
            sheet.paste(a, (x, y))
            sheet.paste(b, (x, y + height + 2))
            x += a.width + 4
    sheet.save(path)
    return path


def bench_style(args, paintings: str, runs: str) -> dict:
    from genart.data.images import to_tensor01
    from genart.evaluate.style_quality import EDGE_CORRELATION_GOAL, blotch_share, blowout_share, colour_pull, edge_correlation, hole_share
    from genart.models import model_section
    from genart.models.style import load_style_image

    log(f"style: genart, {args.steps_style} steps on the shipped paintings at {args.content_size} px, style {args.style_image}")
    model, summary, times = train_genart("style", paintings, runs, args.steps_style, [
        f"data.image_size={args.content_size}", f"model.style_image={args.style_image}", f"scaling.cpus_per_worker={args.threads}",
        *([f"data.crop_size={args.content_crop}"] if args.content_crop else []), *args.style_overrides])
    style01 = load_style_image(args.style_image, model_section(model.meta["config"])["style_size"] or model.image_size)[0]  # (1, 3, h, w), as training saw it
    contents, outputs, names = [], [], []
    for name, img in archive_images():
        x = to_tensor01([img])  # (1, 3, H, W)
        contents.append(x[0])
        outputs.append(model.stylize(x)[0])
        names.append(name)
    per_image = {name: {"hole_share": round(hole_share([c], [o]), 4), "blowout_share": round(blowout_share([c], [o]), 4),
                        "blotch_share": round(blotch_share([c], [o]), 4),
                        "edge_correlation": round(edge_correlation([c], [o]), 4), "colour_pull": round(colour_pull([c], [o], style01), 4)}
                 for name, c, o in zip(names, contents, outputs)}
    return {
        "steps": args.steps_style, "style_image": args.style_image, "images": len(names), "max_side": STYLIZE_MAX_SIDE,
        "hole_share": round(hole_share(contents, outputs), 5), "blowout_share": round(blowout_share(contents, outputs), 5),
        "blotch_share": round(blotch_share(contents, outputs), 5),
        "edge_correlation": round(edge_correlation(contents, outputs), 4), "edge_correlation_goal": EDGE_CORRELATION_GOAL,
        "colour_pull": round(colour_pull(contents, outputs, style01), 4),
        "worst_image": {"hole_share": max(per_image.items(), key=lambda kv: kv[1]["hole_share"])[0],
                        "blowout_share": max(per_image.items(), key=lambda kv: kv[1]["blowout_share"])[0],
                        "blotch_share": max(per_image.items(), key=lambda kv: kv[1]["blotch_share"])[0],
                        "edge_correlation": min(per_image.items(), key=lambda kv: kv[1]["edge_correlation"])[0]},
        "per_image": per_image,
        **times,
        "final_metrics": summary["final_metrics"],
        "pairs": pairs_sheet(list(zip(contents, outputs)), os.path.join(args.out, "style_pairs.png")),
    }


# ---------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps-dcgan", type=int, default=3000, help="training steps of both DCGANs (quickstart: 3000)")
    parser.add_argument("--steps-vae", type=int, default=600, help="training steps of both VAEs (quickstart: 600)")
    parser.add_argument("--steps-vqvae", type=int, default=4600, help="training steps of the VQ-VAE family, its prior's "
                        "included (vqvae.yaml: 600 + 4000), and of its reference VAE (--only ...,vqvae)")
    parser.add_argument("--steps-style", type=int, default=100, help="training steps of the style network (quickstart: 100)")
    parser.add_argument("--num-generated", "--num-samples", type=int, default=1000, help="images generated per generator for the metrics")
    parser.add_argument("--images", type=int, default=1000, help="synthetic images made (quickstart: 1000), 10%% val")
    parser.add_argument("--batch-size", type=int, default=64,
                        help="global batch of every run (the quickstart's: 2 workers x the configs' 32)")
    parser.add_argument("--judge-steps", type=int, default=300, help="training steps of the judge CNN (batch 64)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of the reference loops = scaling.cpus_per_worker")
    parser.add_argument("--style-image", default="starry_night.jpg")
    parser.add_argument("--out", default="results/bench_quality", help="folder for the PNG grids")
    parser.add_argument("--only", default="dcgan,vae,style", help="comma-separated subset of dcgan,vae,vqvae,style")
    parser.add_argument("--style-set", dest="style_overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="extra override of genart's style config, e.g. --style-set model.tone_weight=0")
    parser.add_argument("--content-size", type=int, default=CONTENT_SIZE, help="the paintings' prepared size (quickstart's content_size)")
    parser.add_argument("--content-crop", type=int, default=CONTENT_CROP, help="style training windows, 0 = whole images (content_crop)")
    parser.add_argument("--guidance", type=lambda s: [float(v) for v in s.split(",")], default=[],
                        help="comma-separated classifier-free guidance scales to score the VQ-VAE at too (train it with "
                             "--set model.label_dropout=0.1)")
    parser.add_argument("--no-reference", action="store_true", help="train and score genart's side only (for tuning; no ratios)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="extra override of genart's DCGAN/VAE configs, e.g. --set model.conditional=false")
    args = parser.parse_args()
    args.only = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = set(args.only) - {"dcgan", "vae", "vqvae", "style"}
    if unknown:
        parser.error(f"--only: unknown {', '.join(sorted(unknown))}; use dcgan, vae, vqvae, style")
    return args


def _clean(value):
    """NaN/inf -> None, so the output stays strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def main() -> None:
    args = parse_args()
    # stdout carries only the JSON: Ray forwards its workers' prints to the driver's stdout, so fd 1 becomes stderr
    # (inherited by Ray's processes too) and the JSON goes to a copy of the original stdout.
    json_out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    started = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    args.out = os.path.abspath(args.out)

    from genart import runtime
    from genart.data.read import label_names
    from genart.evaluate.metrics import fid

    t = time.perf_counter()
    runtime.init()
    ray_init_s = time.perf_counter() - t
    os.nice(max(0, 15 - os.nice(0)))  # Ray's workers run at niceness 15; the reference loops get the same
    torch.set_num_threads(args.threads)
    result: dict = {"benchmark": "quality", "config": {k: v for k, v in vars(args).items()}, "thresholds": {
        "recognised_prob": RECOGNISED_PROB, "hole": "output luma < 0.06 where content > 0.25, or > 0.94 where content < 0.75",
        "blowout": "an output channel < 0.02 or > 0.98 where all content channels were in 0.1..0.9",
        "blotch": "output luma (9x9 mean) > 0.06 below the content's and under half of it", **GOALS}, "ray_init_s": round(ray_init_s, 1)}
    with tempfile.TemporaryDirectory(prefix="genart-bench-quality-") as root:
        log(f"preparing {args.images} synthetic images and the shipped paintings in {root}")
        synth, paintings = prepare_data(root, args.images, args.content_size)
        genres = label_names(synth)
        train_x, train_y = read_split(synth, "train")
        val_x, val_y = read_split(synth, "val")
        data_share = np.bincount(train_y.numpy(), minlength=len(genres)) / len(train_y)
        log(f"judge: {args.judge_steps} steps on {len(train_x)} train images")
        t = time.perf_counter()
        judge = train_judge(train_x, train_y, len(genres), args.judge_steps, 64)
        real_feats, _ = judge_outputs(judge, train_x)
        val_feats, val_probs = judge_outputs(judge, val_x)
        nv = count_name(len(val_x))

        def val_accuracy(images01: torch.Tensor) -> float:  # the judge's accuracy on (a variant of) the val images
            return round(float((judge_outputs(judge, images01)[1].argmax(1) == val_y.numpy()).mean()), 4)

        result["data"] = {"train_images": len(train_x), "val_images": len(val_x), "genres": genres,
                          "genre_share_train": {g: round(float(s), 4) for g, s in zip(genres, data_share)}}
        result["judge"] = {
            "architecture": "3 x (conv3x3-BN-ReLU-maxpool) 32/64/128 -> avgpool (128 features) -> linear",
            "training": f"flips + pixel noise sigma ~ U(0, {JUDGE_NOISE}) + Gaussian blur sigma ~ U(0, {JUDGE_BLUR}) px",
            "steps": args.judge_steps, "batch": 64, "seconds": round(time.perf_counter() - t, 1),
            "val_accuracy": val_accuracy(val_x),
            f"recognised_share{nv}_val": round(float((val_probs.max(1) >= RECOGNISED_PROB).mean()), 4),
            # robustness: the same val images with a little pixel noise (generators' grain); a big drop means the
            # judge files imperfect images by their grain rather than their shapes: read its genre shares with care
            "val_accuracy_pixel_noise_0.05": val_accuracy((val_x + 0.05 * torch.randn(
                val_x.shape, generator=torch.Generator().manual_seed(2))).clamp(0, 1)),
            # the same with a 0.8 px blur (a soft generator's edges): it must still name the genre
            "val_accuracy_blur_0.8px": val_accuracy(blur(val_x, torch.full((len(val_x),), 0.8))),
            # what real images score: the floor a perfect generator would reach (few val images: biased upward)
            f"fid{nv}_judge_val_vs_train": round(fid(real_feats, val_feats), 3),
            # the real stripes' own figure: what stripes_banded_share of a generator compares with
            f"stripes_banded_share{nv}_val": banded_share(val_x, val_probs, genres),
        }
        log(f"judge val accuracy {result['judge']['val_accuracy']}")
        for family in ("dcgan", "vae", "vqvae"):
            if family in args.only:
                result[family] = compare_family(family, args, synth, f"{root}/runs", train_x, judge, real_feats, data_share, genres)
                log(f"{family}: {json.dumps({k: v for k, v in result[family].items() if k.endswith(('ratio', 'difference'))})}")
        if "style" in args.only:
            result["style"] = bench_style(args, paintings, f"{root}/runs")
    result["seconds"] = round(time.perf_counter() - started, 1)
    result["load_average_1min"] = round(os.getloadavg()[0], 2)
    json_out.write(json.dumps(_clean(result), indent=1) + "\n")
    json_out.flush()


if __name__ == "__main__":
    main()
