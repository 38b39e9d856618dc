"""Feature extractors for the evaluation metrics: InceptionV3 pool features, or a genart critic's embedding.

    extractor = build_extractor("inception", inception_weights="inception_v3_google-0cc3c7bd.pth")
    extractor = build_extractor("critic:runs/critic")        # Loaded.embed of a trained critic
    feats = extractor(pixels)       # uint8 (N, H, W, 3), or float (N, 3, H, W) in [0, 1] (quantised first) -> (N, D)
Every input goes through `preprocess.network_input` (uint8, center crop, Lanczos): one path for real and generated.
Inception weights are never downloaded: they come from a file or torchvision's download cache, else a UserError.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
from dataclasses import dataclass

import numpy as np
import torch

from genart import storage
from genart.errors import UserError, one_line
from genart.evaluate.preprocess import network_input
from genart.models.family import InferenceSetup, in_passes

DEFAULT_FEATURES = "inception"
INCEPTION_SIZE = 299
INCEPTION_DIM = 2048
INCEPTION_RESIZE = "center crop + Lanczos (Pillow, genart.data.images.model_input) from uint8 pixels"
# What torchvision uses with its IMAGENET1K_V1 Inception weights (inputs are ImageNet-normalised, then
# transform_input maps them to the [-1, 1] range the ported Google weights expect).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TF_FID_NOTE = (
    "torchvision InceptionV3 weights and Pillow's Lanczos resize: values track but are not numerically "
    "comparable with TF-FID (the original TensorFlow Inception graph) or papers' numbers"
)


@dataclass(frozen=True)
class FeatureSpec:
    """Which features: kind "inception" (weights: a file, or None = torchvision's cache) or "critic" (uri: a checkpoint)."""

    kind: str
    uri: str | None = None

    @property
    def text(self) -> str:
        return self.kind if self.uri is None else f"{self.kind}:{self.uri}"


def parse_features(spec: str | None, inception_weights: str | None = None) -> FeatureSpec:
    """"inception", "inception:WEIGHTS" or "critic:CKPT" (None = the default, inception) -> FeatureSpec."""
    spec = (spec or DEFAULT_FEATURES).strip()
    kind, _, uri = spec.partition(":")
    if kind == "inception":
        if uri and inception_weights and uri != inception_weights:
            raise UserError("give the Inception weights once: either --features inception:PATH or --inception-weights PATH")
        return FeatureSpec("inception", uri or inception_weights or None)
    if kind == "critic":
        if not uri:
            raise UserError("--features critic needs a checkpoint: --features critic:RUN_OR_CHECKPOINT_DIR")
        if inception_weights:
            raise UserError("--inception-weights only applies to --features inception")
        return FeatureSpec("critic", uri)
    raise UserError(f"--features {spec!r}: use inception, inception:WEIGHTS_FILE or critic:CHECKPOINT")


def weights_digest(spec: FeatureSpec) -> str:
    """The sha256 of the weights `spec`'s features come from (the critic checkpoint that loads, or the Inception
    weights file), without building the network: a value measured in these features is reusable while it holds."""
    if spec.kind == "critic":
        from genart.models import find_checkpoint
        from genart.models.checkpoint import checkpoint_hash

        return checkpoint_hash(find_checkpoint(spec.uri))
    weights = spec.uri or torchvision_cache_file()
    if not storage.exists(weights):
        raise _missing_weights() if spec.uri is None else UserError(f"Inception weights file not found: {weights}")
    return storage.sha256(weights)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@contextlib.contextmanager
def exact_fp32(device: torch.device):
    """fp32 that is fp32: on CUDA, torch lets cuDNN convolutions (and may let matmuls) run in TF32 on Ampere and
    later GPUs, ~3 significant digits; metric features would then differ from a CPU's under the same cache key.
    IEEE fp32 while features are made (torch 2.9+'s fp32_precision settings), restored after (they are
    process-wide)."""
    if device.type != "cuda":
        yield
        return
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    saved = conv.fp32_precision, matmul.fp32_precision
    conv.fp32_precision = matmul.fp32_precision = "ieee"
    try:
        yield
    finally:
        conv.fp32_precision, matmul.fp32_precision = saved


class Extractor:
    """Base: `name` (metric key suffix), `label` (what reports say), `identity` (the network and its weights), `dim`,
    `resize`, `precision` (what the passes run in)."""

    name = ""
    label = ""
    identity = ""
    dim = 0
    input_size = 0
    resize = ""
    precision = "float32"

    @property
    def stats_key(self) -> str:
        """What reference statistics depend on: the network and its precision (bf16 features on a GPU are not the fp32
        ones a CPU makes). A search index checks `identity` alone: its cosine neighbours survive the precision."""
        return f"{self.identity}:{self.precision}"

    def __call__(self, images) -> np.ndarray:
        """Images (anything `preprocess.to_pixels` takes) -> features (N, dim)."""
        raise NotImplementedError

    def describe(self) -> dict:
        return {"name": self.name, "label": self.label, "identity": self.identity, "dim": self.dim,
                "input_size": self.input_size, "resize": self.resize}


# ---------------------------------------------------------------- InceptionV3


def torchvision_cache_file() -> str:
    """Where torchvision would have saved its IMAGENET1K_V1 Inception weights (we only read it, never download)."""
    from torchvision.models import Inception_V3_Weights

    filename = Inception_V3_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[-1]
    return os.path.join(torch.hub.get_dir(), "checkpoints", filename)


def _missing_weights() -> UserError:
    from torchvision.models import Inception_V3_Weights

    return UserError(
        f"InceptionV3 weights not found (genart never downloads them): pass --inception-weights PATH "
        f"(or --features inception:PATH) with torchvision's inception_v3 state_dict (.pth or .safetensors), "
        f"e.g. {Inception_V3_Weights.IMAGENET1K_V1.url} fetched on a machine with network, or place that file at "
        f"{torchvision_cache_file()}; or use --features critic:CHECKPOINT"
    )


def _read_state_dict(uri: str) -> tuple[dict, str]:
    """A weights file (local or s3://) -> (state_dict, sha256); never unpickles code."""
    if not storage.exists(uri):
        raise UserError(f"Inception weights file not found: {uri}; check --inception-weights")
    data = storage.read_bytes(uri)
    digest = hashlib.sha256(data).hexdigest()  # what storage.sha256(uri) gives, without reading ~100 MB a second time
    try:
        if uri.endswith(".safetensors"):
            from safetensors.torch import load as load_safetensors

            state = load_safetensors(data)
        else:
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - weights_only refuses anything but plain tensors
        first = one_line(exc, with_type=False)
        raise UserError(f"cannot read Inception weights {uri} as a plain state_dict (.pth via weights_only, or .safetensors): {first}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{uri} is not a state_dict of tensors; save one with torch.save(model.state_dict(), PATH)")
    return state, digest


class InceptionExtractor(Extractor):
    """torchvision inception_v3 up to global average pooling: (N, 3, H, W) in [0, 1] -> (N, 2048)."""

    name = "inception"
    dim = INCEPTION_DIM
    input_size = INCEPTION_SIZE
    resize = INCEPTION_RESIZE

    def __init__(self, weights: str | None = None, device: torch.device | str | None = None):
        from torchvision.models import inception_v3

        if weights is None:
            weights = torchvision_cache_file()
            if not os.path.isfile(weights):
                raise _missing_weights()
        state, digest = _read_state_dict(weights)
        # transform_input=True as torchvision sets for its ImageNet weights; init_weights=False: they get replaced
        net = inception_v3(weights=None, aux_logits=True, transform_input=True, init_weights=False)
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise UserError(f"{weights} does not match torchvision's inception_v3 ({one_line(exc, with_type=False)})") from None
        net.fc = torch.nn.Identity()  # pool3 features (N, 2048) instead of logits
        self.device = torch.device(device) if device is not None else default_device()
        self.net = net.eval().requires_grad_(False).to(self.device)
        self.weights_sha256 = digest
        self.identity = f"inception_v3:{digest}:{INCEPTION_SIZE}:{INCEPTION_RESIZE}"
        self.label = f"InceptionV3 pool3, torchvision weights {digest[:12]}"
        self._mean = torch.tensor(IMAGENET_MEAN, device=self.device)[None, :, None, None]
        self._std = torch.tensor(IMAGENET_STD, device=self.device)[None, :, None, None]

    @torch.no_grad()
    def __call__(self, images) -> np.ndarray:
        x = network_input(images, INCEPTION_SIZE).to(self.device)  # (N, 3, 299, 299) in [0, 1]
        x = (x - self._mean) / self._std
        with exact_fp32(self.device):
            return self.net(x).float().cpu().numpy()  # (N, 2048)


# ---------------------------------------------------------------- critic embedding


class CriticExtractor(Extractor):
    """A genart critic's penultimate features (`Loaded.embed`): (N, 3, H, W) in [0, 1] -> (N, embed_dim)."""

    name = "critic"

    def __init__(self, uri: str, device: torch.device | str | None = None, autocast: bool | None = None):
        from genart import models

        device = torch.device(device) if device is not None else default_device()
        # how the batch actors and Serve replicas run a model: on a GPU channels-last and bf16/fp16 autocast,
        # on a CPU plain fp32 (features bit-identical to Loaded.embed's). autocast=False: fp32 on a GPU too (metrics)
        self.setup = InferenceSetup(use_gpu=device.type == "cuda", autocast=autocast)
        self.exact = autocast is False  # metrics: no TF32 either
        self.device = self.setup.device
        self.model = self.setup.place(models.load(uri, family="critic"))
        self.input_size = self.model.image_size
        self.resize = f"center crop + Lanczos (genart.data.images.model_input) to {self.input_size} px, the critic's input"
        digest = self.model.checkpoint_hash
        self.identity = f"critic:{digest}:{self.input_size}"
        self.label = f"critic features: {digest[:12]}"
        self.dim = int(self(np.zeros((1, self.input_size, self.input_size, 3), np.uint8)).shape[1])

    @property
    def precision(self) -> str:
        return self.setup.describe()["precision"]

    def __call__(self, images) -> np.ndarray:
        x = network_input(images, self.input_size)  # (N, 3, S, S) in [0, 1]; embed's own resize is then a no-op
        exact = exact_fp32(self.device) if self.exact else contextlib.nullcontext()
        with self.setup.inference(), exact:  # autocast is per thread: entered here, in the thread that embeds
            return in_passes(lambda chunk: self.model.embed(self.setup.to_device(chunk)).float().cpu(), x,
                             self.device).numpy()  # (N, D)


def build_extractor(spec: FeatureSpec | str | None, inception_weights: str | None = None, device=None,
                    metrics: bool = False) -> Extractor:
    """metrics=True: fp32 passes on any device (Inception's always are), so FID and KID never depend on where the
    features were made; otherwise the critic runs as the batch actors do (bf16 autocast on a GPU: search, audit)."""
    if not isinstance(spec, FeatureSpec):
        spec = parse_features(spec, inception_weights)
    if spec.kind == "inception":
        return InceptionExtractor(spec.uri, device)
    return CriticExtractor(spec.uri, device, autocast=False if metrics else None)


def check_features(spec: str | None, inception_weights: str | None = None) -> FeatureSpec:
    """Fail early (UserError) if the features cannot be built here, e.g. before training starts."""
    parsed = parse_features(spec, inception_weights)
    build_extractor(parsed, device="cpu")
    return parsed
