"""Convolutional beta-VAE (Kingma & Welling 2014; Higgins et al. 2017) for 16-128 px images.

    genart train workflows/configs/vae.yaml --set data.path=data/synth --set model.beta=4.0
Loaded: `.sample(seeds, labels)`, `.interpolate(seed_a, seed_b, steps, label)`, `.reconstruct(x)`; class-conditional
(CVAE) with `--set model.conditional=true`.
"""

from __future__ import annotations

import math
from typing import Iterable, Literal, Sequence

import torch
from PIL import Image
from pydantic import Field
from torch import nn

from genart.config import Section
from genart.errors import UserError
from genart.models.family import GenerativeLoaded, check_size, device_of, meta_from_state
from genart.models.sampling import check_images01, latents, reconstruction_grid, seed_labels, through_square
from genart.models.training import Precision, check_conditional, eval_mode, finite, group_norm, labels_of, unwrap

SIZES = (16, 32, 64, 128)


class VAEConfig(Section):
    family: Literal["vae"] = "vae"  # model family tag
    latent_dim: int = Field(128, ge=1)  # size of the latent code z
    base_channels: int = Field(32, ge=1)  # channels of the first encoder layer; doubles per halving of resolution
    max_channels: int = Field(256, ge=1)  # cap on channels per layer
    beta: float = Field(1.0, ge=0.0)  # weight of the KL term (1.0 = plain VAE; > 1 = more disentangled, blurrier)
    # Decoder likelihood, a Gaussian on pixels. optimal_sigma: its sigma is the batch's own RMS error, in closed
    # form (the sigma-VAE of Rybkin et al. 2021): the KL is weighed against how well the decoder really does, so
    # latents stay in use and samples sharpen as training goes. fixed_sigma: sigma = `sigma` throughout (a
    # summed MSE on [-1, 1] pixels, the old default, was sigma ~0.35 of the pixel range: blur).
    likelihood: Literal["optimal_sigma", "fixed_sigma"] = "optimal_sigma"
    sigma: float = Field(0.1, gt=0, le=1)  # fixed_sigma's sigma, and optimal_sigma's starting point, in [0, 1] pixel units
    min_sigma: float = Field(0.01, gt=0, le=1)  # optimal_sigma never goes below this (a perfect fit would divide by zero)
    # Normalisation in the decoder. none: its output follows the size of z, so the prior's middle decodes to
    # middling pictures. group: GroupNorm after each up-convolution (the old default) divides that size away: every
    # z, even 0, decodes at full contrast, so prior samples came out over-saturated (bench_quality: see README).
    decoder_norm: Literal["none", "group"] = "none"
    # FiLM decoder (Perez et al. 2018; StyleGAN's style input): z (with the genre's embedding, if conditional) gives a
    # per-channel scale and shift after each hidden up-convolution, so a picture's palette reaches every layer, not
    # only through the 4x4 start. Starts as the identity (zero init). bench_quality at 600 steps, seeds 0 / 1: FID
    # 24.2 / 23.7 against 28.3 / 27.8 and recognised share 0.74 / 0.73 against 0.69 / 0.72, but fewer stripes
    # (rarest genre 0.43 / 0.49 against 0.58 / 0.62), so it stays off by default (README, "Sample quality").
    decoder_film: bool = False
    # Class-conditional VAE (CVAE, Sohn et al. 2015): the genre's embedding joins z at the decoder's input and the
    # encoder's features; `sample(seeds, labels)` takes one label per seed (default seed % num_labels, as the
    # conditional DCGAN). A linear head on the encoder's features (cross-entropy, weight 1) names the genre for
    # `reconstruct(x)`, which gets no label. Needs a labelled dataset; false for unlabelled images. On its own the
    # label barely steers the decoder at 600 steps (z carries ~160 nats and the genre with it; bench_quality: 90 %
    # of samples "noise"); `sample_class_weight` (below) was tried to make it count.
    conditional: bool = False
    label_embed_dim: int = Field(16, ge=1)  # conditional only: size of the genre embedding given to encoder and decoder
    # Conditional only: weight (nats per image) of a cross-entropy that trains the decoder so that its prior samples
    # decode(z ~ N(0, I), y) are named y by the class head (an AC-GAN-like term; the encoder and head are held fixed
    # for it, so it cannot redefine the genres). bench_quality at 600 steps: 0 -> FID 118, rarest genre 0 %;
    # 300 -> FID 46, but the decoder satisfies the linear head with patterns a person does not take for the genre
    # (the gradient label draws a yellow dotted pattern; rarest genre 0-10 % of its share). So 0 = off, the default.
    sample_class_weight: float = Field(0.0, ge=0)
    # Where prior samples come from. standard: z ~ N(0, I). genre: a Gaussian fitted to each genre's codes (the
    # encoder's means, their moments tracked while training; ex-post density estimation, Ghosh et al. 2020), and
    # `sample(seeds, labels)` draws genre labels[i] (default seed % num_labels). The decoder only learns to paint the
    # codes its encoder gives; N(0, I) draws land between the genres' codes (the judge filed 72 % as "noise"), a
    # genre's own Gaussian lands among them (bench_quality at 600 steps: see README). Needs labelled data.
    prior: Literal["standard", "genre"] = "standard"
    prior_decay: float = Field(0.998, gt=0, lt=1)  # genre prior: per-code decay of the tracked moments (~500 codes)
    lr: float = Field(1e-3, gt=0)  # Adam learning rate
    weight_decay: float = Field(0.0, ge=0)  # AdamW weight decay
    grid_size: int = Field(32, ge=2)  # images in the grid at each checkpoint: half recons, half samples
    renamed = {"num_samples": "grid_size"}  # the old name of grid_size still loads

    @property
    def takes_labels(self) -> bool:
        """Whether training needs labels and sampling takes them: a CVAE, or a genre prior (or both)."""
        return self.conditional or self.prior == "genre"


def _channels(cfg: VAEConfig, level: int) -> int:
    return min(cfg.base_channels * 2**level, cfg.max_channels)


def _norm(ch: int) -> nn.GroupNorm:
    # GroupNorm, not BatchNorm: reconstructions must not depend on what else is in the batch
    return group_norm(ch)


class GenrePrior(nn.Module):
    """One Gaussian per genre over the encoder's codes, fitted as training goes (exponentially weighted moments).

    observe(mu (B, D), labels (B,)) updates it; draw(eps (N, D), labels (N,)) -> z (N, D) = mean_y + L_y eps, with
    L_y L_y^T the genre's covariance. Before any code is seen it is N(0, I), the standard prior.
    """

    def __init__(self, num_labels: int, latent_dim: int, decay: float):
        super().__init__()
        self.decay = decay
        self.register_buffer("mean", torch.zeros(num_labels, latent_dim))  # (K, D)
        self.register_buffer("second", torch.eye(latent_dim).repeat(num_labels, 1, 1))  # (K, D, D): E[z z^T]
        self._root: tuple[tuple, torch.Tensor] | None = None  # (the moments' versions, square roots (K, D, D))

    @torch.no_grad()
    def observe(self, mu: torch.Tensor, labels: torch.Tensor) -> None:
        mu = mu.detach().float()
        for k in labels.unique().tolist():
            codes = mu[labels == k]  # (n, D)
            w = 1.0 - self.decay ** len(codes)  # the weight n fresh codes get, each decayed as one
            self.mean[k].lerp_(codes.mean(dim=0), w)
            self.second[k].lerp_(codes.T @ codes / len(codes), w)

    def roots(self) -> torch.Tensor:
        """Square roots of the genres' covariances (K, D, D), root @ root^T = cov; cached until the moments change."""
        # A tensor's version counter moves with every in-place write (observe, load_state_dict, DDP's buffer
        # broadcast) and .to() makes new tensors: so the key catches every way the moments can change. Buffers made
        # under torch.inference_mode keep no version counter: those are never cached.
        moments = (self.mean, self.second)
        key = None if any(t.is_inference() for t in moments) else tuple((t._version, t.data_ptr()) for t in moments)
        if key is not None and self._root is not None and self._root[0] == key:
            return self._root[1]
        cov = self.second - self.mean[:, :, None] * self.mean[:, None, :]  # (K, D, D)
        cov = (cov + cov.transpose(1, 2)) / 2
        # eigen square root, clamped: a covariance from few codes can be a little indefinite; Cholesky would fail
        vals, vecs = torch.linalg.eigh(cov)
        root = vecs * vals.clamp(min=1e-6).sqrt()[:, None, :]
        self._root = None if key is None else (key, root)
        return root

    def draw(self, eps: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        root = self.roots()[labels]  # (N, D, D)
        return self.mean[labels] + (root @ eps.float()[:, :, None]).squeeze(-1).to(eps.dtype)


class VAE(nn.Module):
    """forward(x (B, 3, S, S) in [-1, 1], labels (B,) | None) -> (x_hat (B, 3, S, S) in [-1, 1], mu, logvar, class logits).

    Conditional: q(z | x, y) and p(x | z, y) both see the genre's embedding; class logits (B, K) come from a linear
    head on the encoder's features (it names the genre for `reconstruct`). sample_logits=True appends the frozen
    head's logits (B, K) for prior samples decoded with the same labels.
    """

    def __init__(self, cfg: VAEConfig, image_size: int, num_labels: int = 1):
        super().__init__()
        self.levels = int(math.log2(image_size // 4))  # halvings down to 4x4
        enc: list[nn.Module] = []
        cin = 3
        for level in range(self.levels):  # (B, cin, s, s) -> (B, cout, s/2, s/2)
            cout = _channels(cfg, level)
            enc += [nn.Conv2d(cin, cout, 4, 2, 1), _norm(cout), nn.LeakyReLU(0.2, True)]
            cin = cout
        self.encoder = nn.Sequential(*enc, nn.Flatten())  # (B, C * 16)
        self.top = cin
        embed = cfg.label_embed_dim if cfg.conditional else 0
        self.embed = nn.Embedding(num_labels, embed) if cfg.conditional else None
        self.classify = nn.Linear(cin * 16, num_labels) if cfg.conditional else None
        self.to_stats = nn.Linear(cin * 16 + embed, 2 * cfg.latent_dim)  # -> mu, logvar
        self.from_latent = nn.Linear(cfg.latent_dim + embed, cin * 16)
        dec: list[nn.Module] = []
        for level in range(self.levels - 2, -1, -1):  # (B, cin, s, s) -> (B, cout, 2s, 2s)
            cout = _channels(cfg, level)
            norm = [_norm(cout)] if cfg.decoder_norm == "group" else []
            dec += [nn.ConvTranspose2d(cin, cout, 4, 2, 1), *norm, nn.ReLU(True)]
            cin = cout
        dec += [nn.ConvTranspose2d(cin, 3, 4, 2, 1), nn.Tanh()]
        self.decoder = nn.Sequential(*dec)
        self.film = None
        if cfg.decoder_film:  # one (scale, shift) pair per hidden block, applied before its ReLU
            widths = [m.out_channels for m in dec if isinstance(m, nn.ConvTranspose2d)][:-1]
            self.film = nn.ModuleList(nn.Linear(cfg.latent_dim + embed, 2 * w) for w in widths)
            for f in self.film:
                nn.init.zeros_(f.weight)
                nn.init.zeros_(f.bias)
        self.prior = GenrePrior(num_labels, cfg.latent_dim, cfg.prior_decay) if cfg.prior == "genre" else None

    def _with_label(self, h: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        if self.embed is None:
            return h
        if labels is None:
            raise ValueError("a conditional VAE needs labels")  # a bug: callers pass labels or infer them
        return torch.cat([h, self.embed(labels).to(h.dtype)], dim=1)  # (B, F + E)

    def encode(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, logvar), (B, D) each. Conditional without labels: the genre the class head names."""
        h = self.encoder(x)  # (B, F)
        if self.embed is not None and labels is None:
            labels = self.classify(h).argmax(dim=1)
        mu, logvar = self.to_stats(self._with_label(h, labels)).chunk(2, dim=1)  # (B, D) each
        return mu, logvar.clamp(-10.0, 10.0)

    def decode(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        zl = self._with_label(z, labels)
        h = self.from_latent(zl).view(-1, self.top, 4, 4)  # (B, C, 4, 4)
        if self.film is None:
            return self.decoder(h)  # (B, 3, S, S)
        styles = iter(self.film)
        for layer in self.decoder:
            if isinstance(layer, nn.ReLU):
                scale, shift = next(styles)(zl)[:, :, None, None].chunk(2, dim=1)  # (B, C, 1, 1) each
                h = h * (1 + scale) + shift
            h = layer(h)
        return h  # (B, 3, S, S)

    def genre(self, x: torch.Tensor) -> torch.Tensor:
        """The class head's genre for each image (B,): what `reconstruct` conditions on."""
        return self.classify(self.encoder(x)).argmax(dim=1)

    def frozen_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (B, K) with the encoder's and head's weights detached: gradients reach `x` only."""
        from torch.func import functional_call

        def call(module: nn.Module, inp: torch.Tensor) -> torch.Tensor:
            return functional_call(module, {k: v.detach() for k, v in module.named_parameters()}, (inp,))

        return call(self.classify, call(self.encoder, x))

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None,
                sample_logits: bool = False) -> tuple[torch.Tensor, ...]:
        h = self.encoder(x)
        mu, logvar = self.to_stats(self._with_label(h, labels)).chunk(2, dim=1)
        logvar = logvar.clamp(-10.0, 10.0)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)  # reparameterisation
        logits = self.classify(h) if self.classify is not None else None  # inside forward: DDP sees it used
        out = (self.decode(z, labels), mu, logvar, logits)
        if sample_logits:  # prior samples for the same labels, as the frozen class head sees them
            fake = self.decode(torch.randn_like(mu), labels)  # (B, 3, S, S)
            out += (self.frozen_logits(fake),)
        return out

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if f"{prefix}prior.weight" in state_dict:  # the conditional-prior VAE of before 4 December 2026
            raise UserError("this VAE checkpoint has a class-conditional prior (model.conditional before 4 December "
                            "2026), which genart no longer builds; retrain it (genart train ... model.conditional=true)")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _loss_terms(cfg: VAEConfig, x: torch.Tensor, x_hat: torch.Tensor, mu: torch.Tensor,
                logvar: torch.Tensor) -> dict[str, torch.Tensor]:
    """Negative ELBO per image (averaged over the batch) and its parts, for a Gaussian decoder on [-1, 1] pixels.

    nll = sum over pixels of err^2 / (2 s^2) + log s (+ a constant), s = 2 sigma (sigma is in [0, 1] units).
    The KL is to N(0, I), conditional or not (the label is given, not inferred, in the CVAE's ELBO).
    """
    err2 = (x_hat.float() - x.float()).pow(2)  # (B, 3, H, W)
    mse = err2.mean()
    pixels = err2[0].numel()
    if cfg.likelihood == "optimal_sigma":
        s2 = mse.detach().clamp(min=(2 * cfg.min_sigma) ** 2)  # the closed-form best sigma^2 for this batch
    else:
        s2 = torch.tensor((2 * cfg.sigma) ** 2, device=x.device)
    nll = err2.sum(dim=(1, 2, 3)).mean() / (2 * s2) + 0.5 * pixels * torch.log(s2)
    kl = (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp())).float().sum(dim=1).mean()
    return {"loss": nll + cfg.beta * kl, "nll": nll, "kl": kl, "recon_mse": mse, "sigma": s2.sqrt() / 2}


def _decode_prior(vae: VAE, eps: torch.Tensor, labels: torch.Tensor | None, decoder_labels: bool) -> torch.Tensor:
    """Prior samples: standard-normal draws `eps` (N, D) through the prior (genre: mean_y + L_y eps), decoded."""
    z = vae.prior.draw(eps, labels) if vae.prior is not None else eps
    return vae.decode(z, labels if decoder_labels else None)


class VAELoaded(GenerativeLoaded):
    family = "vae"

    def __init__(self, nets: dict, meta: dict, checkpoint_hash: str, cfg: VAEConfig):
        super().__init__({"vae": nets["vae"]}, meta, checkpoint_hash)
        self.latent_dim = cfg.latent_dim
        self.conditional = cfg.takes_labels  # labels choose the genre of a sample
        self.decoder_labels = cfg.conditional  # the CVAE's decoder also takes them

    def _generate(self, z: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        return _decode_prior(self.nets["vae"], z, labels, self.decoder_labels)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [0, 1] -> the decoded posterior mean, same shape (resized to image_size and back). Batch
        jobs and serving both come through here."""
        vae = self.nets["vae"]

        def forward(small: torch.Tensor) -> torch.Tensor:
            labels = vae.genre(small) if self.decoder_labels else None  # no label comes with the picture: the encoder's guess
            return vae.decode(vae.encode(small, labels)[0], labels)

        return through_square(check_images01(x, "reconstruct").to(self.device), self.image_size, forward)


class VAEFamily:
    name = "vae"
    config_cls = VAEConfig
    supported_sizes = SIZES
    needs_labels = False
    generative = True
    best_metric = ("val_loss", "min")
    default_augment = "flip"  # no crops: the decoder must learn the pictures as they are
    recent_batches = 0  # before_checkpoint needs no training batches

    def build(self, cfg: VAEConfig, image_size: int, num_labels: int, inference: bool = False) -> dict[str, nn.Module]:
        check_size(self.name, image_size, SIZES)
        check_conditional(cfg.conditional, num_labels)
        check_conditional(cfg.prior == "genre", num_labels, "model.prior=genre", "model.prior=standard")
        return {"vae": VAE(cfg, image_size, max(num_labels, 1))}

    def trainable(self) -> tuple[str, ...]:
        return ("vae",)

    def optimizers(self, cfg: VAEConfig, nets: dict) -> dict[str, torch.optim.Optimizer]:
        return {"vae": torch.optim.AdamW(nets["vae"].parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)}

    def train_step(
        self, cfg: VAEConfig, nets: dict, opts: dict, batch: dict, step: int, precision: Precision | None = None
    ) -> dict[str, float]:
        precision = precision or Precision()
        vae = nets["vae"]
        vae.train()
        x = batch["image"]  # (B, 3, H, W) in [-1, 1]
        labels = labels_of(batch, required=cfg.takes_labels)  # (B,) or None
        with precision.autocast():
            sample_term = cfg.conditional and cfg.sample_class_weight > 0
            x_hat, mu, logvar, logits, *sample_logits = vae(x, labels, sample_term)
        terms = _loss_terms(cfg, x, x_hat, mu, logvar)  # negative ELBO per image, and its parts
        loss = terms["loss"]
        if logits is not None:  # the class head (a few nats beside an ELBO of ~2,000) also makes the features genre-aware
            terms["class_loss"] = nn.functional.cross_entropy(logits.float(), labels)
            loss = loss + terms["class_loss"]
        if sample_logits:
            terms["sample_class_loss"] = nn.functional.cross_entropy(sample_logits[0].float(), labels)
            loss = loss + cfg.sample_class_weight * terms["sample_class_loss"]
        opts["vae"].zero_grad(set_to_none=True)
        precision.step("vae", loss, opts["vae"])
        if cfg.prior == "genre":  # on every rank; under DDP rank 0's buffers are broadcast at the next forward
            unwrap(vae).prior.observe(mu, labels)
        return finite({k: terms[k].item() for k in ("loss", "recon_mse", "kl", "sigma", "class_loss", "sample_class_loss") if k in terms}, "vae")

    def before_checkpoint(self, cfg, nets: dict, recent: Sequence[dict] = ()) -> None:
        """Nothing to bring up to date: the trained nets are the inference nets."""

    def evaluate(self, cfg: VAEConfig, nets: dict, batches: Iterable[dict]) -> dict[str, float]:
        """val_loss (negative ELBO per image, posterior sample), val_recon_mse (per pixel, posterior mean), val_kl."""
        vae = unwrap(nets["vae"])
        device = device_of(nets)
        totals = {"loss": 0.0, "recon_mse": 0.0, "kl": 0.0}
        count = 0
        g = torch.Generator(device=device).manual_seed(0)  # the same posterior noise at every evaluation
        with eval_mode(vae):
            for batch in batches:
                x = batch["image"].to(device).float()
                labels = batch["label"].to(device).long() if cfg.conditional else None
                mu, logvar = vae.encode(x, labels)
                z = mu + torch.randn(mu.shape, generator=g, device=device) * torch.exp(0.5 * logvar)
                terms = _loss_terms(cfg, x, vae.decode(z, labels), mu, logvar)
                mean_mse = (vae.decode(mu, labels) - x).pow(2).mean()
                n = len(x)
                totals["loss"] += terms["loss"].item() * n
                totals["recon_mse"] += mean_mse.item() * n
                totals["kl"] += terms["kl"].item() * n
                count += n
        return {f"val_{k}": v / count for k, v in totals.items()} if count else {}

    def fixed_inputs(self, cfg: VAEConfig, image_size: int, num_labels: int, example_batch: dict) -> dict:
        half = cfg.grid_size // 2
        fixed = {"images": example_batch["image"][:half].detach().cpu().float(), "z": latents(range(half), cfg.latent_dim)}
        if cfg.takes_labels:  # samples: genres in turn, as `.sample` does
            fixed["labels"] = torch.tensor(seed_labels(range(half), None, max(num_labels, 1)))
        if cfg.conditional:  # reconstructions: their images' own labels
            fixed["real_labels"] = example_batch["label"][:half].detach().cpu().long().clamp(min=0)
        return fixed

    def sample_images(self, cfg: VAEConfig, nets: dict, fixed: dict) -> Image.Image:
        """Rows alternate real / reconstruction, then samples from the fixed latents."""
        vae = unwrap(nets["vae"])
        device = device_of(nets)
        with eval_mode(vae):
            x = fixed["images"].to(device)  # (n, 3, S, S) in [-1, 1]
            real_labels = None if fixed.get("real_labels") is None else fixed["real_labels"].to(device)
            recon = vae.decode(vae.encode(x, real_labels)[0], real_labels)
            z = fixed["z"].to(device)
            labels = None if fixed.get("labels") is None else fixed["labels"].to(device)
            samples = _decode_prior(vae, z, labels, cfg.conditional)
        return reconstruction_grid(x, recon, samples)

    def inference(self, cfg: VAEConfig, nets: dict, state: dict) -> VAELoaded:
        return VAELoaded({"vae": unwrap(nets["vae"])}, meta_from_state(state), state.get("checkpoint_hash", ""), cfg)


FAMILY = VAEFamily()
