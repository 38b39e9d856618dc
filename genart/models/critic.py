"""A small CNN classifier over the dataset's labels (e.g. artist or genre); its penultimate features are an embedding.

    genart train workflows/configs/critic.yaml --set data.path=data/synth
Loaded: `.predict(x) -> probs (N, K)`, `.embed(x) -> (N, embed_dim)`, `.predict_and_embed(x)`, `.label_names`. BatchNorm is fine under DDP
(each worker normalises its own shard; running stats are broadcast from rank 0).
"""

from __future__ import annotations

from typing import Iterable, Literal, Sequence

import numpy as np
import torch
from PIL import Image
from pydantic import Field
from torch import nn
from torch.nn import functional as F

from genart.config import Section
from genart.errors import UserError
from genart.models.family import Loaded, device_of, meta_from_state
from genart.models.sampling import check_images01, resize
from genart.models.training import Precision, eval_mode, finite, group_norm, labels_of, recalibrate_batchnorm, unwrap
from genart.train.augment import degrade


class CriticConfig(Section):
    family: Literal["critic"] = "critic"  # model family tag
    base_channels: int = Field(32, ge=1)  # channels of the first stage; doubles each stage
    num_stages: int = Field(3, ge=1, le=6)  # conv stages, each halving the resolution (image_size >= 2**num_stages)
    embed_dim: int = Field(128, ge=1)  # size of the embedding (`.embed`, the penultimate layer)
    norm: Literal["batch", "group"] = "batch"  # BatchNorm (fast, fine under DDP) or GroupNorm (batch-size independent)
    dropout: float = Field(0.1, ge=0, lt=1)  # dropout before the classifier layer
    lr: float = Field(1e-3, gt=0)  # AdamW learning rate
    weight_decay: float = Field(1e-4, ge=0)  # AdamW weight decay
    label_smoothing: float = Field(0.0, ge=0, lt=1)  # cross-entropy label smoothing
    # Robustness for scoring generated pictures: each training image gets pixel noise (sigma ~ U(0, train_noise), in
    # [0, 1] units) and a Gaussian blur (sigma ~ U(0, train_blur) px at 32 px, scaled with the side). Trained on clean
    # images alone, the quickstart's critic named the VAE's soft circles and noise fields "stripes" (26 of 26) and
    # half the DCGAN's grainy noise fields too: it judged grain and softness, not the genre. The same recipe as
    # bench_quality's judge. It costs a point or two of clean val accuracy (quickstart 0.96 against 0.98; MNIST's
    # best 0.989 against 0.990); 0 and 0 train on the pictures as they are.
    train_noise: float = Field(0.1, ge=0, le=1)
    train_blur: float = Field(1.0, ge=0, le=4)


class Critic(nn.Module):
    """x (B, 3, S, S) in [-1, 1] -> logits (B, K). `stages` are reusable conv features (also a style loss network)."""

    def __init__(self, cfg: CriticConfig, num_labels: int):
        super().__init__()
        norm = (lambda c: nn.BatchNorm2d(c)) if cfg.norm == "batch" else group_norm
        stages, cin = [], 3
        for i in range(cfg.num_stages):  # (B, cin, s, s) -> (B, cout, s/2, s/2)
            cout = cfg.base_channels * 2**i
            stages.append(
                nn.Sequential(
                    nn.Conv2d(cin, cout, 3, 1, 1, bias=False), norm(cout), nn.ReLU(True),
                    nn.Conv2d(cout, cout, 3, 1, 1, bias=False), norm(cout), nn.ReLU(True),
                    nn.MaxPool2d(2),
                )
            )
            cin = cout
        self.stages = nn.ModuleList(stages)
        self.fc = nn.Linear(cin, cfg.embed_dim)
        self.dropout = nn.Dropout(cfg.dropout)
        self.classifier = nn.Linear(cfg.embed_dim, num_labels)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages:
            x = stage(x)
        return F.relu(self.fc(x.mean(dim=(2, 3))))  # global average pool (B, C) -> (B, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.embed(x)))  # (B, K)


class CriticLoaded(Loaded):
    family = "critic"

    def _prepare(self, x: torch.Tensor, what: str) -> torch.Tensor:
        x = check_images01(x, what)
        return resize(x.to(self.device).float(), self.image_size) * 2 - 1  # (N, 3, S, S) in [-1, 1]

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [0, 1] -> class probabilities (N, K), columns in `label_names` order."""
        return F.softmax(self.nets["critic"](self._prepare(x, "predict")).float(), dim=1)

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [0, 1] -> penultimate features (N, embed_dim)."""
        return self.nets["critic"].embed(self._prepare(x, "embed")).float()

    @torch.no_grad()
    def predict_and_embed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(probs, features) from one pass through the conv stages: the same numbers `predict` and `embed` give."""
        net = self.nets["critic"]
        features = net.embed(self._prepare(x, "predict"))
        return F.softmax(net.classifier(net.dropout(features)).float(), dim=1), features.float()


def confusion(logits: torch.Tensor, labels: torch.Tensor, k: int) -> np.ndarray:
    """(N, K) logits, (N,) labels -> (K, K) counts, rows = true class, columns = predicted."""
    pred = logits.argmax(dim=1).cpu().numpy()
    out = np.zeros((k, k), dtype=np.int64)
    np.add.at(out, (labels.cpu().numpy(), pred), 1)
    return out


def confusion_image(matrix: np.ndarray, label_names: list[str] | None = None, title: str = "") -> Image.Image:
    """A confusion matrix as a PNG-ready PIL image (matplotlib, no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    k = len(matrix)
    names = label_names or [str(i) for i in range(k)]
    size = 2.5 + 0.45 * k
    fig = Figure(figsize=(size, size), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(k), names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(k), names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    for i in range(k):
        for j in range(k):
            ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=7, color="black")
    fig.tight_layout()
    fig.canvas.draw()
    return Image.fromarray(np.asarray(fig.canvas.buffer_rgba())[:, :, :3].copy(), "RGB")


class CriticFamily:
    name = "critic"
    config_cls = CriticConfig
    supported_sizes = None  # any size >= 2**num_stages (checked in build)
    needs_labels = True
    generative = False
    best_metric = ("val_accuracy", "max")
    default_augment = "crop_flip"
    recent_batches = 8  # before_checkpoint re-measures BatchNorm statistics on the latest 8 training batches

    def build(self, cfg: CriticConfig, image_size: int, num_labels: int, inference: bool = False) -> dict[str, nn.Module]:
        if num_labels < 2:
            raise UserError("the critic is a classifier: it needs a labelled dataset with at least 2 classes (one folder per class)")
        if image_size < 2**cfg.num_stages:
            raise UserError(f"critic: image_size {image_size} is too small for num_stages={cfg.num_stages}; use >= {2**cfg.num_stages}")
        return {"critic": Critic(cfg, num_labels)}

    def trainable(self) -> tuple[str, ...]:
        return ("critic",)

    def optimizers(self, cfg: CriticConfig, nets: dict) -> dict[str, torch.optim.Optimizer]:
        return {"critic": torch.optim.AdamW(nets["critic"].parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)}

    def train_step(
        self, cfg: CriticConfig, nets: dict, opts: dict, batch: dict, step: int, precision: Precision | None = None
    ) -> dict[str, float]:
        precision = precision or Precision()
        critic = nets["critic"]
        critic.train()
        x = degrade(batch["image"], cfg.train_noise, cfg.train_blur)  # (B, 3, H, W) in [-1, 1]
        labels = labels_of(batch, required=True)  # (B,)
        with precision.autocast():
            logits = critic(x)  # (B, K)
        if int(labels.max()) >= logits.shape[1]:
            raise UserError(f"label {int(labels.max())} is out of range for a critic built for {logits.shape[1]} classes")
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=cfg.label_smoothing)
        opts["critic"].zero_grad(set_to_none=True)
        precision.step("critic", loss, opts["critic"])
        accuracy = (logits.argmax(dim=1) == labels).float().mean()
        return finite({"loss": loss.item(), "accuracy": accuracy.item()}, "critic")

    def before_checkpoint(self, cfg: CriticConfig, nets: dict, recent: Sequence[dict] = ()) -> None:
        """BatchNorm's running statistics, re-measured on the latest training batches with the weights being saved
        (precise BN; Wu & Johnson 2021, "Rethinking 'Batch' in BatchNorm"). The running averages trail the weights,
        and at lr 1e-3 the weights move fast: one quickstart's eval-mode critic named 92 % of its own training grids
        "circles" (eval-mode accuracy on its training images 0.80, train-mode 0.97); re-measured, 0.998."""
        if cfg.norm == "batch" and recent:
            recalibrate_batchnorm(nets["critic"], [(batch["image"],) for batch in recent])

    def evaluate(self, cfg: CriticConfig, nets: dict, batches: Iterable[dict]) -> dict[str, float]:
        """val_loss, val_accuracy, and val_accuracy_class_<i> per class seen in the validation data."""
        critic = unwrap(nets["critic"])
        device = device_of(nets)
        k = critic.classifier.out_features
        matrix = np.zeros((k, k), dtype=np.int64)
        loss_sum, count = 0.0, 0
        with eval_mode(critic):
            for batch in batches:
                labels = labels_of(batch, required=True).to(device)
                logits = critic(batch["image"].to(device).float())
                loss_sum += F.cross_entropy(logits.float(), labels, reduction="sum").item()
                matrix += confusion(logits, labels, k)
                count += len(labels)
        if not count:
            return {}
        metrics = {"val_loss": loss_sum / count, "val_accuracy": float(np.trace(matrix)) / count}
        for i in range(k):
            if matrix[i].sum():
                metrics[f"val_accuracy_class_{i}"] = float(matrix[i, i] / matrix[i].sum())
        return metrics

    def fixed_inputs(self, cfg: CriticConfig, image_size: int, num_labels: int, example_batch: dict) -> dict:
        # The loop passes a validation batch when it has one: the checkpoint PNG is its confusion matrix.
        return {
            "images": example_batch["image"][:256].detach().cpu().float(),
            "labels": example_batch["label"][:256].detach().cpu().long(),
            "label_names": list(example_batch.get("label_names", []) or []),
        }

    def sample_images(self, cfg: CriticConfig, nets: dict, fixed: dict) -> Image.Image:
        critic = unwrap(nets["critic"])
        device = device_of(nets)
        keep = fixed["labels"] >= 0
        with eval_mode(critic):
            logits = critic(fixed["images"][keep].to(device))
        k = critic.classifier.out_features
        matrix = confusion(logits, fixed["labels"][keep], k)
        acc = np.trace(matrix) / max(1, matrix.sum())
        names = fixed.get("label_names") or None
        return confusion_image(matrix, names if names and len(names) == k else None, f"fixed images: accuracy {acc:.2f}")

    def inference(self, cfg: CriticConfig, nets: dict, state: dict) -> CriticLoaded:
        return CriticLoaded({"critic": unwrap(nets["critic"])}, meta_from_state(state), state.get("checkpoint_hash", ""))


FAMILY = CriticFamily()
