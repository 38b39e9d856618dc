"""DCGAN (Radford et al. 2016) for 16-128 px images: generator, discriminator, an EMA generator, optional class conditioning.

    genart datasets synth --out data/raw/synth --num 2000 --size 64
    genart prepare data/raw/synth --out data/synth --size 64
    genart train workflows/configs/dcgan.yaml --set data.path=data/synth --set train.max_steps=2000
The EMA generator (`generator_ema`) is what `.sample` and the sample grids use; the raw generator only trains.
"""

from __future__ import annotations

import copy
import math
from typing import Iterable, Literal, Sequence

import torch
from PIL import Image
from pydantic import Field
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import spectral_norm as _sn

from genart.config import Section
from genart.errors import UserError
from genart.train.augment import diff_augment
from genart.models.family import GenerativeLoaded, check_size, device_of, meta_from_state
from genart.models.sampling import latents, make_grid
from genart.models.training import (
    Precision,
    check_conditional,
    eval_mode,
    finite,
    frozen,
    labels_of,
    recalibrate_batchnorm,
    unwrap,
    update_ema,
)

SIZES = (16, 32, 64, 128)


class DCGANConfig(Section):
    family: Literal["dcgan"] = "dcgan"  # model family tag
    latent_dim: int = Field(128, ge=1)  # size of the noise vector z
    base_channels: int = Field(64, ge=1)  # channels at G's last / D's first layer; doubles per halving of resolution
    max_channels: int = Field(512, ge=1)  # cap on channels per layer
    loss: Literal["non_saturating", "hinge"] = "non_saturating"  # GAN objective
    spectral_norm: bool = False  # spectral norm on D's layers (and no BatchNorm in D): steadier, esp. with hinge
    conditional: bool = False  # class-conditional on the dataset's labels (label embedding in G, projection in D)
    label_embed_dim: int = Field(32, ge=1)  # size of G's label embedding, concatenated to z
    # AC-GAN term (Odena et al. 2017), conditional only: D also names the genre of real images (cross-entropy), and G
    # is trained so that D names its fakes' labels. The projection term alone lets G ignore labels for thousands of
    # steps; this gradient makes each label draw its own genre early. 0 = off.
    class_weight: float = Field(0.0, ge=0)
    # Conditional only: every BatchNorm of G gets a scale and shift per genre (conditional BatchNorm, de Vries et al.
    # 2017, as in SNGAN and BigGAN), so the label steers each layer, not only the input vector.
    class_norm: bool = False
    # Mode-seeking term (MSGAN, Mao et al. 2019): G is also asked to map two latents of the same label to images as
    # far apart as the latents are, so each label keeps drawing varied pictures instead of one favourite. 0 = off.
    mode_seeking: float = Field(0.0, ge=0)
    # Each pair's image / latent distance ratio counts only up to this cap (DSGAN's tau, Yang et al. 2019): a pair
    # already as varied as two real pictures of one genre gets no further push. Uncapped, the term keeps paying for
    # distance past the data's own variety, and the cheapest distance is saturated colour: flat neon gradients.
    # 0 = no cap.
    mode_seeking_cap: float = Field(0.0, ge=0)
    # DiffAugment policy: the same differentiable transforms on real and generated images before D (Zhao et al.
    # 2020). Small datasets otherwise let D memorise the real images within a few hundred steps. [] = off.
    diff_augment: list[Literal["color", "translation", "cutout"]] = ["color", "translation", "cutout"]
    ema_decay: float = Field(0.999, ge=0.0, lt=1.0)  # EMA of G's weights per step (warmed up over the first steps)
    lr_g: float = Field(2e-4, gt=0)  # generator Adam learning rate
    lr_d: float = Field(2e-4, gt=0)  # discriminator Adam learning rate
    beta1: float = Field(0.5, ge=0, lt=1)  # Adam beta1 (0.5 as in the DCGAN paper; 0.0 is common with hinge)
    beta2: float = Field(0.999, ge=0, lt=1)  # Adam beta2
    grid_size: int = Field(64, ge=1)  # images in the fixed-noise grid written at each checkpoint
    renamed = {"num_samples": "grid_size"}  # the old name of grid_size still loads
    eval_samples: int = Field(256, ge=8)  # generated/real images compared by the val_swd metric


def _channels(cfg: DCGANConfig, level: int) -> int:
    return min(cfg.base_channels * 2**level, cfg.max_channels)


def _init(module: nn.Module) -> None:
    """DCGAN init: N(0, 0.02) weights (also label embeddings), BatchNorm gamma ~ N(1, 0.02).

    Under spectral norm `m.weight` is computed from `parametrizations.weight.original`: the init must go there,
    or it writes into a throw-away tensor and the layer keeps PyTorch's default init.
    """
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear, nn.Embedding)):
            weight = m.parametrizations.weight.original if parametrize.is_parametrized(m, "weight") else m.weight
            nn.init.normal_(weight, 0.0, 0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d) and m.affine:
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)
    for m in module.modules():  # after the loop above, which gave their embeddings N(0, 0.02)
        if isinstance(m, ClassBatchNorm):
            m.reset_parameters()


class ClassBatchNorm(nn.Module):
    """BatchNorm whose affine scale and shift are looked up by label: (B, C, H, W), (B,) -> (B, C, H, W)."""

    def __init__(self, channels: int, num_labels: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(channels, affine=False)
        self.scale = nn.Embedding(num_labels, channels)
        self.shift = nn.Embedding(num_labels, channels)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.scale.weight, 1.0, 0.02)  # the DCGAN init of a BatchNorm's gamma, per genre
        nn.init.zeros_(self.shift.weight)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.norm(x) * self.scale(labels)[:, :, None, None] + self.shift(labels)[:, :, None, None]


class Generator(nn.Module):
    """z (B, latent_dim) [+ label (B,)] -> image (B, 3, S, S) in [-1, 1]; 4x4 then transposed-conv doublings."""

    def __init__(self, cfg: DCGANConfig, image_size: int, num_labels: int):
        super().__init__()
        levels = int(math.log2(image_size // 4))  # doublings from 4x4
        self.embed = nn.Embedding(num_labels, cfg.label_embed_dim) if cfg.conditional else None
        in_dim = cfg.latent_dim + (cfg.label_embed_dim if cfg.conditional else 0)
        ch = _channels(cfg, levels - 1)
        norm = (lambda c: ClassBatchNorm(c, num_labels)) if cfg.conditional and cfg.class_norm else nn.BatchNorm2d
        layers: list[nn.Module] = [nn.ConvTranspose2d(in_dim, ch, 4, 1, 0, bias=False), norm(ch), nn.ReLU(True)]
        for level in range(levels - 2, -1, -1):  # (B, ch, s, s) -> (B, ch', 2s, 2s)
            out = _channels(cfg, level)
            layers += [nn.ConvTranspose2d(ch, out, 4, 2, 1, bias=False), norm(out), nn.ReLU(True)]
            ch = out
        layers += [nn.ConvTranspose2d(ch, 3, 4, 2, 1), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        _init(self)

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.embed is not None:
            z = torch.cat([z, self.embed(labels)], dim=1)  # (B, latent + embed)
        h = z[:, :, None, None]
        for layer in self.net:  # (B, in, 1, 1) -> (B, 3, S, S)
            h = layer(h, labels) if isinstance(layer, ClassBatchNorm) else layer(h)
        return h


class Discriminator(nn.Module):
    """image (B, 3, S, S) [+ label (B,)] -> logits (B,); strided convs down to 4x4, projection term when conditional."""

    def __init__(self, cfg: DCGANConfig, image_size: int, num_labels: int):
        super().__init__()
        sn = _sn if cfg.spectral_norm else (lambda m: m)
        levels = int(math.log2(image_size // 4))
        layers: list[nn.Module] = [sn(nn.Conv2d(3, _channels(cfg, 0), 4, 2, 1)), nn.LeakyReLU(0.2, True)]
        for level in range(1, levels):  # (B, ch, s, s) -> (B, 2ch, s/2, s/2)
            cin, cout = _channels(cfg, level - 1), _channels(cfg, level)
            layers.append(sn(nn.Conv2d(cin, cout, 4, 2, 1, bias=cfg.spectral_norm)))
            if not cfg.spectral_norm:
                layers.append(nn.BatchNorm2d(cout))
            layers.append(nn.LeakyReLU(0.2, True))
        self.features = nn.Sequential(*layers)  # (B, C, 4, 4)
        ch = _channels(cfg, levels - 1)
        self.head = sn(nn.Conv2d(ch, 1, 4, 1, 0))  # (B, 1, 1, 1)
        self.project = sn(nn.Embedding(num_labels, ch)) if cfg.conditional else None  # Miyato & Koyama 2018
        self.classify = nn.Linear(ch, num_labels) if cfg.conditional and cfg.class_weight > 0 else None  # AC-GAN
        _init(self)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> real/fake logits (B,), and genre logits (B, L) when the AC-GAN head is on, else None.

        Both come out of forward (not a second method) so that DDP sees every parameter used in one call."""
        h = self.features(x)  # (B, C, 4, 4)
        out = self.head(h).flatten()  # (B,)
        pooled = h.sum(dim=(2, 3))  # (B, C)
        if self.project is not None:
            out = out + (self.project(labels) * pooled).sum(dim=1)
        return out, None if self.classify is None else self.classify(pooled / h[0, 0].numel())


def mode_seeking_loss(fake: torch.Tensor, z: torch.Tensor, cap: float = 0.0) -> torch.Tensor:
    """MSGAN's term over the pairs (i, i + B/2), which share a label: the mean over pairs of 1 / ratio, where ratio is
    the pair's mean absolute pixel distance per unit of latent distance, counted up to `cap` (0 = no cap).

    Per pair, not per batch, so that a capped pair stops pulling while the pairs still too alike keep theirs."""
    half = fake.shape[0] // 2
    image = (fake[:half] - fake[half : 2 * half]).abs().flatten(1).mean(1).float()  # (half,)
    latent = (z[:half] - z[half : 2 * half]).abs().mean(1).float()
    ratio = image / latent
    if cap > 0:
        ratio = ratio.clamp(max=cap)  # past the cap: no gradient
    return (1 / (ratio + 1e-5)).mean()


def _losses(kind: str, real_logits: torch.Tensor | None, fake_logits: torch.Tensor) -> torch.Tensor:
    """D loss when real_logits is given, else G loss."""
    if real_logits is None:
        return -fake_logits.mean() if kind == "hinge" else F.softplus(-fake_logits).mean()
    if kind == "hinge":
        return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, projections: int = 128, seed: int = 0) -> float:
    """Sliced Wasserstein distance between two image sets (N, 3, H, W) pooled to 16x16 pixels: lower is closer.

    A cheap, deterministic distribution distance (after Karras et al. 2018's SWD), not a perceptual metric like FID.
    """
    n = min(len(a), len(b))
    a = F.adaptive_avg_pool2d(a[:n].float(), 16).flatten(1).cpu()  # (n, 768)
    b = F.adaptive_avg_pool2d(b[:n].float(), 16).flatten(1).cpu()
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(a.shape[1], projections, generator=g)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)  # (768, P) unit directions
    pa, _ = torch.sort(a @ dirs, dim=0)  # (n, P)
    pb, _ = torch.sort(b @ dirs, dim=0)
    return float((pa - pb).abs().mean())


class DCGANLoaded(GenerativeLoaded):
    family = "dcgan"

    def __init__(self, nets: dict, meta: dict, checkpoint_hash: str, cfg: DCGANConfig):
        super().__init__({"generator_ema": nets["generator_ema"]}, meta, checkpoint_hash)
        self.latent_dim = cfg.latent_dim
        self.conditional = cfg.conditional

    def _generate(self, z: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        return self.nets["generator_ema"](z, labels)


class DCGANFamily:
    name = "dcgan"
    config_cls = DCGANConfig
    supported_sizes = SIZES
    needs_labels = False  # only when model.conditional=true, checked in build()
    generative = True
    # best.json = the latest checkpoint (the EMA generator only gets better at these budgets), as stylegan2-ada's
    # snapshots without a metric: val_swd over the val split (105 images in the quickstart) ranked step 750 above a
    # visibly sharper step 1500. For a real ranking set eval.every_checkpoints and eval.best_metric (fid1k_critic).
    best_metric = ("step", "max")
    default_augment = "flip"  # no crops: the generator must learn the pictures as they are
    recent_batches = 0  # before_checkpoint needs no training batches
    # fixed latents whose batches re-measure the EMA generator's BatchNorm statistics before every checkpoint
    bn_batches, bn_batch_size = 8, 64

    def build(self, cfg: DCGANConfig, image_size: int, num_labels: int, inference: bool = False) -> dict[str, nn.Module]:
        check_size(self.name, image_size, SIZES)
        check_conditional(cfg.conditional, num_labels)
        if cfg.class_weight > 0 and not cfg.conditional:
            raise UserError("model.class_weight > 0 is the AC-GAN term of a class-conditional DCGAN: set model.conditional=true")
        num_labels = max(num_labels, 1)
        generator = Generator(cfg, image_size, num_labels)
        ema = copy.deepcopy(generator).eval().requires_grad_(False)
        if inference:
            return {"generator_ema": ema}
        return {"generator": generator, "discriminator": Discriminator(cfg, image_size, num_labels), "generator_ema": ema}

    def trainable(self) -> tuple[str, ...]:
        return ("generator", "discriminator")

    def optimizers(self, cfg: DCGANConfig, nets: dict) -> dict[str, torch.optim.Optimizer]:
        betas = (cfg.beta1, cfg.beta2)
        return {
            "generator": torch.optim.Adam(nets["generator"].parameters(), lr=cfg.lr_g, betas=betas),
            "discriminator": torch.optim.Adam(nets["discriminator"].parameters(), lr=cfg.lr_d, betas=betas),
        }

    def train_step(
        self, cfg: DCGANConfig, nets: dict, opts: dict, batch: dict, step: int, precision: Precision | None = None
    ) -> dict[str, float]:
        precision = precision or Precision()
        gen, disc = nets["generator"], nets["discriminator"]  # possibly DDP-wrapped: call them, don't reach inside
        gen.train()
        disc.train()
        real = batch["image"]  # (B, 3, H, W) in [-1, 1]
        labels = labels_of(batch, required=cfg.conditional)  # (B,) or None
        z = torch.randn(real.shape[0], cfg.latent_dim, device=real.device)  # (B, latent)
        half = real.shape[0] // 2
        fake_labels = labels
        if cfg.mode_seeking > 0 and labels is not None and half > 0:  # fake i and i + half share a label (MSGAN pairs)
            fake_labels = torch.cat([labels[:half], labels[:half], labels[2 * half :]])

        # discriminator: real up, fake down (fake detached so G gets no gradient here)
        policy = tuple(cfg.diff_augment)
        with precision.autocast():
            fake = gen(z, fake_labels)  # (B, 3, H, W)
            real_logits, real_classes = disc(diff_augment(real, policy), labels)
            fake_logits, _ = disc(diff_augment(fake.detach(), policy), fake_labels)
            loss_d = _losses(cfg.loss, real_logits, fake_logits)
            if real_classes is not None:  # D learns the genres from real images only (fakes would teach it G's errors)
                loss_d = loss_d + cfg.class_weight * F.cross_entropy(real_classes.float(), labels)
        opts["discriminator"].zero_grad(set_to_none=True)
        precision.step("discriminator", loss_d, opts["discriminator"])

        # generator: gradients flow through a frozen D
        with frozen(disc), precision.autocast():
            g_logits, g_classes = disc(diff_augment(fake, policy), fake_labels)
            loss_g = _losses(cfg.loss, None, g_logits)
            if g_classes is not None:
                loss_g = loss_g + cfg.class_weight * F.cross_entropy(g_classes.float(), fake_labels)
            if cfg.mode_seeking > 0 and half > 0:
                loss_g = loss_g + cfg.mode_seeking * mode_seeking_loss(fake, z, cfg.mode_seeking_cap)
        opts["generator"].zero_grad(set_to_none=True)
        precision.step("generator", loss_g, opts["generator"])

        # EMA warm-up (decay grows from ~0 to ema_decay) so early samples are not stuck at the initial weights
        update_ema(nets["generator_ema"], gen, min(cfg.ema_decay, (1 + step) / (10 + step)))
        return finite(
            {
                "loss_d": loss_d.item(),
                "loss_g": loss_g.item(),
                "d_real": real_logits.detach().float().mean().item(),
                "d_fake": fake_logits.detach().float().mean().item(),
            },
            "dcgan",
        )

    def before_checkpoint(self, cfg: DCGANConfig, nets: dict, recent: Sequence[dict] = ()) -> None:
        """The EMA generator's BatchNorm statistics, measured on its own averaged weights (fixed latents)."""
        ema = nets["generator_ema"]
        device = device_of(nets)
        n = self.bn_batches * self.bn_batch_size
        z = latents(range(20_000, 20_000 + n), cfg.latent_dim).to(device)  # (n, latent), fixed seeds
        labels = torch.arange(n, device=device) % max(1, ema.embed.num_embeddings) if ema.embed is not None else None
        recalibrate_batchnorm(ema, [
            (z[i : i + self.bn_batch_size], None if labels is None else labels[i : i + self.bn_batch_size])
            for i in range(0, n, self.bn_batch_size)
        ])

    def evaluate(self, cfg: DCGANConfig, nets: dict, batches: Iterable[dict]) -> dict[str, float]:
        """val_swd: sliced Wasserstein distance (16x16 pixels) between EMA-G samples and up to eval_samples val images."""
        ema = nets["generator_ema"]
        device = device_of(nets)
        reals, labels = [], []
        for batch in batches:
            reals.append(batch["image"].float().cpu())
            labels.append(batch.get("label", torch.full((len(batch["image"]),), -1)).cpu())
            if sum(len(r) for r in reals) >= cfg.eval_samples:
                break
        if not reals:
            return {}
        real = torch.cat(reals)[: cfg.eval_samples]
        label = torch.cat(labels)[: len(real)].long()
        with eval_mode(ema):
            z = latents(range(10_000, 10_000 + len(real)), cfg.latent_dim).to(device)  # fixed eval seeds
            cond = label.clamp(min=0).to(device) if cfg.conditional else None
            fake = torch.cat([ema(z[i : i + 64], None if cond is None else cond[i : i + 64]).float().cpu() for i in range(0, len(z), 64)])
        return {"val_swd": sliced_wasserstein(real, fake)}

    def fixed_inputs(self, cfg: DCGANConfig, image_size: int, num_labels: int, example_batch: dict) -> dict:
        fixed = {"z": latents(range(cfg.grid_size), cfg.latent_dim)}  # (N, latent)
        if cfg.conditional:  # one row of the grid per class, the classes in turn
            nrow = int(math.ceil(math.sqrt(cfg.grid_size)))
            fixed["labels"] = (torch.arange(cfg.grid_size) // nrow) % max(num_labels, 1)
        return fixed

    def sample_images(self, cfg: DCGANConfig, nets: dict, fixed: dict) -> Image.Image:
        ema = nets["generator_ema"]
        device = device_of(nets)
        labels = fixed.get("labels")
        with eval_mode(ema):
            out = ema(fixed["z"].to(device), None if labels is None else labels.to(device))  # (N, 3, H, W)
        return make_grid((out.float() + 1) / 2, nrow=int(math.ceil(math.sqrt(len(out)))))

    def inference(self, cfg: DCGANConfig, nets: dict, state: dict) -> DCGANLoaded:
        return DCGANLoaded({"generator_ema": unwrap(nets["generator_ema"])}, meta_from_state(state), state.get("checkpoint_hash", ""), cfg)


FAMILY = DCGANFamily()
