"""Loss networks for style transfer: ImageNet VGG16/19, seeded random multi-scale filters, or a trained critic.

    feats = build_loss_network("random", seed=0)      # FeatureNet: x (B, 3, H, W) in [0, 1] -> {layer: (B, C, h, w)}
    style01, style_info = load_style_image("wave.jpg", 256)          # genart.models.style
    loss = StyleLoss(feats, content_layers, style_layers, style01, style_info, center_gram=True)  # content / style / TV
Never downloads: VGG weights come from torchvision's hub cache or a file named in the config.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from genart.errors import UserError, one_line

VGG_LAYERS = {  # torchvision's `features` layout (conv widths, "M" = max-pool); module indices match its state_dict
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}
DEFAULT_LAYERS = {  # (content layers, style layers): Johnson et al. 2016 for vgg16, Gatys et al. 2016 for vgg19
    "vgg16": (["relu2_2"], ["relu1_2", "relu2_2", "relu3_3", "relu4_3"]),
    "vgg19": (["relu4_2"], ["relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1"]),
    "random": (["k3"], ["k3", "k5", "k7", "k11"]),
}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class FeatureNet(nn.Module):
    """Base: `layer_names` (in depth order), `info` (what to record in a checkpoint), forward(x01, layers) -> dict."""

    layer_names: list[str]
    info: dict

    def defaults(self) -> tuple[list[str], list[str]]:
        raise NotImplementedError


# ---------------------------------------------------------------- VGG


class VGGFeatures(FeatureNet):
    def __init__(self, arch: str, state_dict: dict[str, torch.Tensor], source: str):
        super().__init__()
        layers: list[nn.Module] = []
        self.layer_names, self._taps = [], {}  # relu name -> module index
        cin, block, conv = 3, 1, 0
        for width in VGG_LAYERS[arch]:
            if width == "M":
                layers.append(nn.MaxPool2d(2, 2))
                block, conv = block + 1, 0
                continue
            conv += 1
            layers += [nn.Conv2d(cin, width, 3, padding=1), nn.ReLU()]
            name = f"relu{block}_{conv}"
            self.layer_names.append(name)
            self._taps[len(layers) - 1] = name
            cin = width
        self.features = nn.Sequential(*layers)
        self.arch = arch
        self._load(state_dict, source)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.info = {"loss_network": arch, "weights": source}

    def _load(self, state_dict: dict[str, torch.Tensor], source: str) -> None:
        # Accept a whole torchvision VGG state_dict ("features.0.weight", "classifier...") or just its features.
        if any(k.startswith("features.") for k in state_dict):
            state_dict = {k[len("features.") :]: v for k, v in state_dict.items() if k.startswith("features.")}
        try:
            self.features.load_state_dict(state_dict, strict=True)
        except RuntimeError as exc:
            first = one_line(exc, with_type=False)
            raise UserError(f"{source}: not a torchvision {self.arch} state_dict ({first}); give {self.arch} weights") from None

    def defaults(self) -> tuple[list[str], list[str]]:
        return DEFAULT_LAYERS[self.arch]

    def forward(self, x01: torch.Tensor, layers: set[str]) -> dict[str, torch.Tensor]:
        x = (x01 - self.mean) / self.std
        out: dict[str, torch.Tensor] = {}
        for i, module in enumerate(self.features):
            x = module(x)
            name = self._taps.get(i)
            if name in layers:
                out[name] = x
                if len(out) == len(layers):
                    break  # nothing deeper is needed
        return out


def vgg_cache_path(arch: str) -> Path:
    """Where torchvision keeps the ImageNet weights it downloaded, e.g. ~/.cache/torch/hub/checkpoints/vgg16-397923af.pth."""
    from torchvision.models import VGG16_Weights, VGG19_Weights

    url = (VGG16_Weights if arch == "vgg16" else VGG19_Weights).DEFAULT.url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A weights file (local or s3://, so every node of a cluster can read it) -> state_dict, without ever
    unpickling code: safetensors, or torch.load(weights_only=True)."""
    import io

    from genart import storage

    name = str(path)
    if storage.is_s3(name):
        try:
            source: io.BytesIO | str = io.BytesIO(storage.read_bytes(name))
        except UserError:  # storage's "not found: ..."
            raise UserError(f"weights file not found: {name}") from None
    else:
        local = Path(name).expanduser()
        if not local.is_file():
            raise UserError(f"weights file not found: {local}")
        name = source = str(local)
    try:
        if name.endswith(".safetensors"):
            from safetensors.torch import load, load_file

            return load(source.getvalue()) if isinstance(source, io.BytesIO) else load_file(source)
        data = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - refused pickles and corrupt files both end here
        first = one_line(exc, with_type=False)
        raise UserError(f"{name}: cannot read as plain weights (safetensors or a weights-only torch file): {first}") from None
    if isinstance(data, dict) and "state_dict" in data and isinstance(data["state_dict"], dict):
        data = data["state_dict"]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise UserError(f"{name}: expected a state_dict (a mapping of names to tensors)")
    return data


def vgg(arch: str, weights_path: str | None = None) -> VGGFeatures:
    """ImageNet VGG features from `weights_path` if given, else torchvision's cache; never downloads."""
    if weights_path:
        return VGGFeatures(arch, read_state_dict(weights_path), str(weights_path))
    cached = vgg_cache_path(arch)
    if not cached.is_file():
        raise UserError(
            f"loss_network={arch} needs ImageNet {arch} weights, not found at {cached}: fetch them once with "
            f"`python -c \"import torchvision; torchvision.models.{arch}(weights='DEFAULT')\"` on a machine with network "
            f"(or copy the file there), or set model.loss_network_weights=/path/to/{arch}.pth, or use model.loss_network=random"
        )
    return VGGFeatures(arch, read_state_dict(cached), str(cached))


# ---------------------------------------------------------------- random multi-scale filters


class RandomMultiscale(FeatureNet):
    """One layer of fixed random filters at several kernel sizes (Ustyuzhaninov et al., ICLR 2017), ReLU'd.

    Seeded with its own torch.Generator, so the same `seed` gives the same network in every process and run.
    Weaker than ImageNet VGG, but needs no pretrained weights.
    """

    def __init__(self, seed: int = 0, filters: int = 64, kernel_sizes: tuple[int, ...] = (3, 5, 7, 11)):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.convs = nn.ModuleDict()
        for k in kernel_sizes:
            conv = nn.Conv2d(3, filters, k, padding=k // 2, padding_mode="reflect")
            fan_in = 3 * k * k
            with torch.no_grad():
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) / fan_in**0.5)  # unit-variance responses
                conv.bias.copy_(torch.randn(conv.bias.shape, generator=g) * 0.1)
            self.convs[f"k{k}"] = conv
        self.layer_names = list(self.convs.keys())
        self.info = {"loss_network": "random-multiscale", "seed": seed, "filters": filters, "kernel_sizes": list(kernel_sizes)}

    def defaults(self) -> tuple[list[str], list[str]]:
        content, style = DEFAULT_LAYERS["random"]
        return [n for n in content if n in self.convs], [n for n in style if n in self.convs]

    def forward(self, x01: torch.Tensor, layers: set[str]) -> dict[str, torch.Tensor]:
        x = x01 * 2 - 1
        return {name: torch.relu(self.convs[name](x)) for name in layers}


# ---------------------------------------------------------------- a trained critic


class CriticFeatures(FeatureNet):
    """The conv stages of a trained critic checkpoint ("stage1" ... "stageN")."""

    def __init__(self, uri: str):
        super().__init__()
        from genart.models import load

        loaded = load(uri, family="critic")
        self.stages = loaded.nets["critic"].stages
        self.layer_names = [f"stage{i + 1}" for i in range(len(self.stages))]
        self.info = {"loss_network": f"critic:{uri}", "critic_checkpoint_hash": loaded.checkpoint_hash}

    def defaults(self) -> tuple[list[str], list[str]]:
        return [self.layer_names[min(1, len(self.layer_names) - 1)]], list(self.layer_names)

    def forward(self, x01: torch.Tensor, layers: set[str]) -> dict[str, torch.Tensor]:
        x, out = x01 * 2 - 1, {}
        for name, stage in zip(self.layer_names, self.stages):
            x = stage(x)
            if name in layers:
                out[name] = x
        return out


def build_loss_network(spec: str, weights_path: str | None = None, seed: int = 0, filters: int = 64) -> FeatureNet:
    """"vgg16" | "vgg19" | "random" | "critic:<checkpoint or run uri>" -> a frozen FeatureNet in eval mode."""
    if spec in ("vgg16", "vgg19"):
        net = vgg(spec, weights_path)
    elif spec == "random":
        net = RandomMultiscale(seed=seed, filters=filters)
    elif spec.startswith("critic:") and len(spec) > len("critic:"):
        net = CriticFeatures(spec[len("critic:") :])
    else:
        raise UserError(f"loss_network {spec!r}: use vgg16, vgg19, random or critic:<checkpoint uri>")
    return net.eval().requires_grad_(False)


# ---------------------------------------------------------------- the losses


def gram(features: torch.Tensor, center: bool = False) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, C) Gram matrix normalised by C*H*W (so it does not grow with image size).

    center=True subtracts each channel's spatial mean first (a feature covariance): the texture without the
    colour mass. With an uncentered Gram the cheapest way to match a dark style's statistics is to paint
    dark blobs over the content (measured on the quickstart: 8.2% hole pixels, vs 1.9% centered).
    """
    b, c, h, w = features.shape
    f = features.float().reshape(b, c, h * w)
    if center:
        f = f - f.mean(dim=2, keepdim=True)
    return f @ f.transpose(1, 2) / (c * h * w)


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference between neighbouring pixels: penalises high-frequency noise."""
    return (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()


def _relative_mse(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(x, target) / target.pow(2).mean().clamp_min(1e-12)


class StyleLoss(nn.Module):
    """Frozen loss network + the style image's Gram targets. forward(out01, content01) -> {content, style, tv}.

    Not saved in checkpoints (`persist_in_checkpoint = False`): it is rebuilt from the config; `checkpoint_info()`
    records which network and style image were used.
    """

    persist_in_checkpoint = False

    def __init__(
        self,
        net: FeatureNet,
        content_layers: list[str] | None,
        style_layers: list[str] | None,
        style01: torch.Tensor,  # (1, 3, h, w) in [0, 1]
        style_info: dict,
        center_gram: bool = False,
    ):
        super().__init__()
        default_content, default_style = net.defaults()
        self.content_layers = list(content_layers or default_content)
        self.style_layers = list(style_layers or default_style)
        for name in self.content_layers + self.style_layers:
            if name not in net.layer_names:
                raise UserError(f"loss network layer {name!r} does not exist; choose from {', '.join(net.layer_names)}")
        self.net = net
        with torch.no_grad():
            feats = net(style01, set(self.style_layers))  # style01: (1, 3, h, w) in [0, 1]
            for name in self.style_layers:
                self.register_buffer(f"gram_{name}", gram(feats[name], center_gram), persistent=False)  # (1, C, C)
        self.center_gram = center_gram
        self._info = {**net.info, "content_layers": self.content_layers, "style_layers": self.style_layers,
                      "center_gram": center_gram, **style_info}

    def checkpoint_info(self) -> dict:
        return dict(self._info)

    def train(self, mode: bool = True) -> "StyleLoss":
        return super().train(False)  # always eval: a critic's BatchNorm must keep its statistics

    def forward(self, out01: torch.Tensor, content01: torch.Tensor) -> dict[str, torch.Tensor]:
        out_feats = self.net(out01.float(), set(self.content_layers) | set(self.style_layers))
        with torch.no_grad():
            target_feats = self.net(content01.float(), set(self.content_layers))
        # Both terms are relative squared errors (divided by the target's mean square), so their scale does not
        # depend on the loss network's activation sizes and one set of weights suits vgg, random and critic alike.
        content = sum(_relative_mse(out_feats[n], target_feats[n]) for n in self.content_layers) / len(self.content_layers)
        style = 0.0
        for name in self.style_layers:
            g = gram(out_feats[name], self.center_gram)  # (B, C, C)
            style = style + _relative_mse(g, getattr(self, f"gram_{name}").expand_as(g))
        return {"content": content, "style": style / len(self.style_layers), "tv": total_variation(out01.float())}
