"""Fast neural style transfer (Johnson et al. 2016): a feed-forward transformer net trained against a loss network.

    genart train workflows/configs/style.yaml --set data.path=data/synth --set model.style_image=wave.jpg
Loaded: `.stylize(x) -> (N, 3, H, W)`, any H and W (padded internally, cropped back).
"""

from __future__ import annotations

import hashlib
import math
from typing import Iterable, Literal, Sequence

import torch
from PIL import Image
from pydantic import Field, field_validator
from torch import nn

from genart import storage
from genart.config import Section
from genart.errors import UserError
from genart.models.family import Loaded, device_of, meta_from_state
from genart.models.sampling import check_images01, make_grid
from genart.models.training import Precision, eval_mode, finite, unwrap
from genart.models.loss_networks import StyleLoss, build_loss_network


class StyleConfig(Section):
    family: Literal["style"] = "style"  # model family tag
    style_image: str = "starry_night.jpg"  # a shipped style (genart/assets/styles/<name>) or a path / s3:// uri
    # The style image's shorter side (px) when its Gram targets are taken; null = data.image_size, the content's
    # own scale (also with data.crop_size windows), so brush strokes in the targets have the pixel scale the net
    # learns at (it keeps that scale at any input size: train at about the size you will stylize at).
    style_size: int | None = Field(None, ge=16, le=2048)
    loss_network: str = "vgg16"  # vgg16 | vgg19 (ImageNet weights) | random (seeded random-multiscale) | critic:<uri>
    loss_network_weights: str | None = None  # VGG weights file (.pth weights-only or .safetensors), local or s3://; default: torch hub cache
    random_seed: int = Field(0, ge=0)  # seed of the random loss network (same seed = same network)
    random_filters: int = Field(64, ge=1)  # filters per kernel size in the random loss network
    content_layers: list[str] | None = None  # loss-network layers for the content loss; None = the network's default
    style_layers: list[str] | None = None  # loss-network layers for the style (Gram) loss; None = the network's default
    content_weight: float = Field(1.0, ge=0)  # weight of the feature (content) loss
    style_weight: float = Field(10.0, ge=0)  # weight of the Gram (style) loss; both losses are relative errors, ~1 at start
    tv_weight: float = Field(1e-2, ge=0)  # weight of the total-variation (smoothness) loss
    # Style statistics as feature covariances (Gram of mean-subtracted features): texture without colour mass,
    # so the net does not paint dark blobs to match a dark style. False = the classic Gram (Gatys, Johnson).
    center_gram: bool = True
    range_weight: float = Field(10.0, ge=0)  # input_skip: weight of the squared excess outside [0, 1] (no clipped blobs)
    # Weight of the tone term: the squared change of the picture's light and dark masses (luma averaged over
    # tone_block x tone_block px). A hole is a low-frequency change of tone; strokes, texture and hue are not.
    # At 100 the style term outbid it: the net bought style loss with dark masses (blotches) on dark hills and
    # hatched drawings, few blocks darkened by 0.2+ cost little in a mean; at 1000 that no longer pays.
    tone_weight: float = Field(1000.0, ge=0)
    tone_block: int = Field(4, ge=2)
    channels: int = Field(32, ge=1)  # width of the transformer's first layer (32 in the paper; 4-8 for tests)
    # Output = input + a learned change (in pixels, the change's last layer starting at zero): training starts from
    # the content image instead of a grey blur, so short CPU runs already keep the content. The change is not
    # squashed (a sigmoid on logits froze dark and light pixels and trapped overshoots as black holes); the
    # range_weight term keeps it inside [0, 1] and inference clips. False = the paper's net (a scaled tanh).
    input_skip: bool = False
    num_res_blocks: int = Field(5, ge=0)  # residual blocks at 1/4 resolution (5 in the paper)
    lr: float = Field(1e-3, gt=0)  # Adam learning rate
    grid_size: int = Field(8, ge=1)  # content images stylised in the grid written at each checkpoint
    renamed = {"num_samples": "grid_size"}  # the old name of grid_size still loads

    @field_validator("loss_network")
    @classmethod
    def _known_network(cls, value: str) -> str:
        if value in ("vgg16", "vgg19", "random") or (value.startswith("critic:") and len(value) > 7):
            return value
        raise ValueError("must be vgg16, vgg19, random or critic:<checkpoint uri>")

    def files_from(self, folder: str) -> "StyleConfig":
        """A copy whose files named relative to `folder` (where genart started) are absolute: a Ray Train worker
        builds the loss network in a folder of its own (the driver's check loaded them, every worker then failed).
        Only the workers' copy: the run's config keeps the names as given, so a resume from another folder (a new
        `genart submit` working dir) is the same run. A shipped style stays a name."""
        from genart.assets import STYLES

        update = {}
        if not (STYLES / self.style_image).is_file():
            update["style_image"] = storage.absolute(self.style_image, folder)
        if self.loss_network.startswith("critic:"):
            update["loss_network"] = "critic:" + storage.absolute(self.loss_network.removeprefix("critic:"), folder)
        if self.loss_network_weights:
            update["loss_network_weights"] = storage.absolute(self.loss_network_weights, folder)
        return self.model_copy(update=update)


class ConvLayer(nn.Sequential):
    """Reflection-padded conv: (B, cin, H, W) -> (B, cout, H/stride, W/stride)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1):
        super().__init__(nn.ReflectionPad2d(kernel // 2), nn.Conv2d(cin, cout, kernel, stride))


class ResidualBlock(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.body = nn.Sequential(
            ConvLayer(ch, ch, 3), nn.InstanceNorm2d(ch, affine=True), nn.ReLU(True),
            ConvLayer(ch, ch, 3), nn.InstanceNorm2d(ch, affine=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class UpsampleConv(nn.Sequential):
    """Nearest-neighbour x2 then conv (Odena et al. 2016): no checkerboard artefacts from transposed convs."""

    def __init__(self, cin: int, cout: int, kernel: int):
        super().__init__(nn.Upsample(scale_factor=2, mode="nearest"), ConvLayer(cin, cout, kernel))


class TransformerNet(nn.Module):
    """x (B, 3, H, W) in [0, 1], H and W multiples of 4 -> stylised (B, 3, H, W) in [0, 1]."""

    def __init__(self, channels: int = 32, num_res_blocks: int = 5, input_skip: bool = False):
        super().__init__()
        c = channels
        self.input_skip = input_skip
        norm = lambda ch: nn.InstanceNorm2d(ch, affine=True)  # noqa: E731
        self.net = nn.Sequential(
            ConvLayer(3, c, 9), norm(c), nn.ReLU(True),  # (B, c, H, W)
            ConvLayer(c, 2 * c, 3, 2), norm(2 * c), nn.ReLU(True),  # (B, 2c, H/2, W/2)
            ConvLayer(2 * c, 4 * c, 3, 2), norm(4 * c), nn.ReLU(True),  # (B, 4c, H/4, W/4)
            *[ResidualBlock(4 * c) for _ in range(num_res_blocks)],
            UpsampleConv(4 * c, 2 * c, 3), norm(2 * c), nn.ReLU(True),  # (B, 2c, H/2, W/2)
            UpsampleConv(2 * c, c, 3), norm(c), nn.ReLU(True),  # (B, c, H, W)
            ConvLayer(c, 3, 9),  # (B, 3, H, W)
        )
        if input_skip:  # the net learns a change to the image, starting from none: the output starts as the input
            nn.init.zeros_(self.net[-1][1].weight)
            nn.init.zeros_(self.net[-1][1].bias)

    def forward(self, x01: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, 3, H, W); in [0, 1] without input_skip, else about it (callers clip)."""
        y = self.net(x01 * 2 - 1)  # (B, 3, H, W)
        if self.input_skip:
            return x01 + y
        return torch.sigmoid(y)  # sigmoid(y) = (tanh(y/2) + 1) / 2: a scaled tanh as in the paper


def _soft_clip(x: torch.Tensor) -> torch.Tensor:
    """Clip to [0, 1] in the forward pass, identity in the backward one: the loss network sees what users will,
    while pixels past the range still get the gradient that brings them back (range_weight pulls them in too)."""
    return x + (x.clamp(0, 1) - x).detach()


def _tone(x01: torch.Tensor, block: int) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> (B, 1, H/block, W/block): Rec. 601 luma averaged over block x block squares."""
    luma = (x01 * x01.new_tensor([0.299, 0.587, 0.114])[:, None, None]).sum(dim=1, keepdim=True)
    return nn.functional.avg_pool2d(luma, block, ceil_mode=True)


def pad_to_multiple(x: torch.Tensor, multiple: int = 4, minimum: int = 8) -> tuple[torch.Tensor, tuple[int, int]]:
    """Pad (N, C, H, W) on the bottom/right to a multiple of `multiple` (and at least `minimum`); returns (padded, (H, W))."""
    h, w = x.shape[-2:]
    th, tw = max(minimum, math.ceil(h / multiple) * multiple), max(minimum, math.ceil(w / multiple) * multiple)
    if (th, tw) == (h, w):
        return x, (h, w)
    mode = "reflect" if th - h < h and tw - w < w else "replicate"  # reflect needs the pad to be smaller than the side
    return nn.functional.pad(x, (0, tw - w, 0, th - h), mode=mode), (h, w)


class StyleLoaded(Loaded):
    family = "style"

    @torch.no_grad()
    def stylize(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [0, 1] -> stylised (N, 3, H, W) in [0, 1]; any H, W."""
        x = check_images01(x, "stylize")
        padded, (h, w) = pad_to_multiple(x.to(self.device).float())
        return self.nets["transformer"](padded)[..., :h, :w].float().clamp(0, 1)


def load_style_image(name: str, size: int) -> tuple[torch.Tensor, dict]:
    """A shipped style name, a path or an s3:// uri -> (1, 3, h, w) in [0, 1] with shorter side `size`, + provenance."""
    from genart.assets import STYLES, style_image
    from genart.data.images import Reject, decode_image, to_tensor01

    if storage.is_s3(name):
        data = storage.read_bytes(name)
    else:
        path = style_image(name)
        if not path.is_file():
            shipped = ", ".join(sorted(p.name for p in STYLES.glob("*.jpg")))
            raise UserError(f"style image not found: {name}; set model.style_image to a path or one of: {shipped}")
        data = path.read_bytes()
    try:
        img = decode_image(data)
    except Reject as exc:
        raise UserError(f"style image {name}: {exc.reason}") from None
    scale = size / min(img.size)
    img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.Resampling.LANCZOS)
    return to_tensor01([img]), {"style_image": name, "style_image_sha256": hashlib.sha256(data).hexdigest()}


class StyleFamily:
    name = "style"
    config_cls = StyleConfig
    supported_sizes = None  # the transformer is fully convolutional
    needs_labels = False
    generative = False
    best_metric = ("val_loss", "min")
    default_augment = "crop_flip"  # content crops
    recent_batches = 0  # before_checkpoint needs no training batches

    def build(self, cfg: StyleConfig, image_size: int, num_labels: int, inference: bool = False) -> dict[str, nn.Module]:
        transformer = TransformerNet(cfg.channels, cfg.num_res_blocks, cfg.input_skip)
        if inference:
            return {"transformer": transformer}
        style01, style_info = load_style_image(cfg.style_image, cfg.style_size or image_size)
        net = build_loss_network(cfg.loss_network, cfg.loss_network_weights, cfg.random_seed, cfg.random_filters)
        loss = StyleLoss(net, cfg.content_layers, cfg.style_layers, style01, style_info, center_gram=cfg.center_gram)
        return {"transformer": transformer, "loss_network": loss}

    def trainable(self) -> tuple[str, ...]:
        return ("transformer",)

    def optimizers(self, cfg: StyleConfig, nets: dict) -> dict[str, torch.optim.Optimizer]:
        return {"transformer": torch.optim.Adam(nets["transformer"].parameters(), lr=cfg.lr)}

    def _terms(self, cfg: StyleConfig, loss_network: nn.Module, out: torch.Tensor, content: torch.Tensor) -> dict[str, torch.Tensor]:
        """content / style / tv (loss network, on the clipped output, as users see it) + range, and their weighted sum."""
        terms = loss_network(_soft_clip(out.float()), content)  # a no-op on the sigmoid net's in-range output
        terms["range"] = (out.float() - out.float().clamp(0, 1)).pow(2).mean()
        terms["tone"] = (_tone(_soft_clip(out.float()), cfg.tone_block) - _tone(content.float(), cfg.tone_block)).pow(2).mean()
        terms["loss"] = (cfg.content_weight * terms["content"] + cfg.style_weight * terms["style"]
                         + cfg.tv_weight * terms["tv"] + cfg.range_weight * terms["range"] + cfg.tone_weight * terms["tone"])
        return terms

    def train_step(
        self, cfg: StyleConfig, nets: dict, opts: dict, batch: dict, step: int, precision: Precision | None = None
    ) -> dict[str, float]:
        precision = precision or Precision()
        transformer = nets["transformer"]
        transformer.train()
        content = (batch["image"] + 1) / 2  # (B, 3, H, W) in [0, 1]
        with precision.autocast():
            out = transformer(content)  # (B, 3, H, W) in [0, 1]
        terms = self._terms(cfg, nets["loss_network"], out, content)  # the loss network runs in fp32
        opts["transformer"].zero_grad(set_to_none=True)
        precision.step("transformer", terms["loss"], opts["transformer"])
        return finite({(k if k == "loss" else f"{k}_loss"): v.item() for k, v in terms.items()}, "style")

    def before_checkpoint(self, cfg, nets: dict, recent: Sequence[dict] = ()) -> None:
        """Nothing to bring up to date: the trained nets are the inference nets."""

    def evaluate(self, cfg: StyleConfig, nets: dict, batches: Iterable[dict]) -> dict[str, float]:
        """val_loss (weighted sum) and its val_content_loss / val_style_loss / val_tv_loss terms on validation images."""
        transformer = unwrap(nets["transformer"])
        device = device_of(nets)
        sums: dict[str, float] = {}
        count = 0
        with eval_mode(transformer):
            for batch in batches:
                content = (batch["image"].to(device).float() + 1) / 2
                terms = self._terms(cfg, nets["loss_network"], transformer(content), content)
                for key, value in terms.items():
                    sums[key] = sums.get(key, 0.0) + float(value) * len(content)
                count += len(content)
        if not count:
            return {}
        return {("val_loss" if k == "loss" else f"val_{k}_loss"): v / count for k, v in sums.items()}

    def fixed_inputs(self, cfg: StyleConfig, image_size: int, num_labels: int, example_batch: dict) -> dict:
        return {"content": ((example_batch["image"][: cfg.grid_size].detach().cpu().float() + 1) / 2)}  # (n, 3, S, S)

    def sample_images(self, cfg: StyleConfig, nets: dict, fixed: dict) -> Image.Image:
        """Top row: the fixed content images; bottom row: stylised."""
        transformer = unwrap(nets["transformer"])
        content = fixed["content"].to(device_of(nets))
        with eval_mode(transformer):
            padded, (h, w) = pad_to_multiple(content)
            out = transformer(padded)[..., :h, :w]
        return make_grid(torch.cat([content, out.float()]), nrow=len(content))

    def inference(self, cfg: StyleConfig, nets: dict, state: dict) -> StyleLoaded:
        return StyleLoaded({"transformer": unwrap(nets["transformer"])}, meta_from_state(state), state.get("checkpoint_hash", ""))


FAMILY = StyleFamily()
