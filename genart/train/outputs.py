"""The files rank 0 keeps in a run folder (local or s3://) besides checkpoints: metrics.jsonl, loss.png,
samples/step-XXXXXX.png, best.json (Ray Train deletes old checkpoints). Every write replaces a whole object.

    <run>/config.yaml  metrics.jsonl  loss.png  best.json  samples/step-000100.png  step-000100/ ...
    <run>/stop-requested   while a preempted driver waits for the workers' last checkpoint (see trainer.py)
    <run>/failed           while a driver ends a run whose worker hit an error that a retry would hit again
"""

from __future__ import annotations

import io
import json
import math
import re

from genart import storage

CHECKPOINT_DIR = re.compile(r"^step-(\d{6,})$")
STOP_REQUEST = "stop-requested"
FAILED = "failed"
# Keys of a metrics.jsonl row that are not losses or metrics: left out of loss.png and the run summary.
BOOKKEEPING = ("step", "start_step", "images_per_second", "epoch", "seconds")
PER_CLASS = re.compile(r"_class_\d+$")  # per-class metrics stay in metrics.jsonl, out of the plot


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def stop_request(run_dir: str) -> str:
    """The marker a driver writes on SIGTERM: the workers checkpoint at their next log step and return."""
    return storage.join(run_dir, STOP_REQUEST)


def failure_note(run_dir: str) -> str:
    """The note a worker writes before it raises an error that no retry can cure (a UserError, a diverged loss):
    the retry Ray Train starts anyway returns at once, and the driver prints the note as one line."""
    return storage.join(run_dir, FAILED)


def list_checkpoints(run_dir: str, complete: bool = False) -> list[tuple[int, str]]:
    """(step, name) of every `step-*` folder in the run, oldest first; complete=True: only those whose files are all
    there at their recorded sizes (`checkpoint.incomplete`), so a checkpoint whose upload was cut short is left out."""
    from genart.models.checkpoint import incomplete  # torch: only when checkpoints are checked

    found = []
    for uri in storage.listdir(run_dir):
        name = uri.rstrip("/").rsplit("/", 1)[-1]
        match = CHECKPOINT_DIR.match(name)
        if match and (not complete or incomplete(uri) is None):
            found.append((int(match.group(1)), name))
    return sorted(found)


def read_metrics(run_dir: str) -> list[dict]:
    path = storage.join(run_dir, "metrics.jsonl")
    if not storage.exists(path):
        return []
    return [json.loads(line) for line in storage.read_text(path).splitlines() if line.strip()]


def read_best(run_dir: str) -> dict | None:
    path = storage.join(run_dir, "best.json")
    return json.loads(storage.read_text(path)) if storage.exists(path) else None


class RunFiles:
    """Rank 0's view of the run folder. Resuming from step N drops metric rows after N (they are redone)."""

    def __init__(self, run_dir: str, start_step: int):
        self.run_dir = run_dir
        self.rows = [r for r in read_metrics(run_dir) if r.get("step", 0) <= start_step]
        self.best = read_best(run_dir)
        if self.best and self.best.get("step", 0) > start_step:  # named a checkpoint of an attempt resumed before it
            self._rebuild_best(self.best)
        self._flushed = -1

    def _rebuild_best(self, stale: dict) -> None:
        """best.json again from the kept rows whose checkpoints are complete (the one it named is not: the run
        resumes from an older one), so it never names a missing checkpoint nor loses to a worse newcomer."""
        metric, mode = stale.get("metric"), stale.get("mode", "min")
        saved = {step for step, _ in list_checkpoints(self.run_dir, complete=True)}
        self.best = None
        for row in sorted(self.rows, key=lambda r: r.get("step", 0)):
            if row.get("step") in saved:
                self.update_best(row["step"], row, metric, mode)
        if self.best is None:
            storage.remove(storage.join(self.run_dir, "best.json"))

    # -------------------------------------------------------------- metrics

    def recover_row(self, step: int, row: dict, metric: str | None, mode: str) -> bool:
        """Resuming from checkpoint `step` whose metrics row never reached metrics.jsonl (the attempt was killed
        between Ray storing the checkpoint and rank 0 writing that step's files): put the row the checkpoint was
        saved with back, and let it compete for best.json. True if a row was recovered."""
        if not step or not row or any(r.get("step") == step for r in self.rows):
            return False
        self.rows.append({**row, "step": step})
        self.flush_metrics()
        self.update_best(step, row, metric, mode)
        return True

    def add_metrics(self, row: dict) -> None:
        self.rows.append(row)

    def flush_metrics(self) -> None:
        """Rewrite metrics.jsonl (one JSON object per report). Cheap: rows are ~200 bytes."""
        if self._flushed == len(self.rows):
            return
        text = "".join(json.dumps(r, sort_keys=False) + "\n" for r in self.rows)
        storage.write_text(storage.join(self.run_dir, "metrics.jsonl"), text)
        self._flushed = len(self.rows)

    def plot_losses(self) -> None:
        """Redraw loss.png: one panel per metric against step; val_X (only at checkpoints, as dots) shares X's panel."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        keys = [k for k in _metric_keys(self.rows) if not PER_CLASS.search(k)]
        panels = [k for k in keys if not (k.startswith("val_") and k[4:] in keys)]
        if not panels:
            return
        cols = min(3, len(panels))
        nrows = math.ceil(len(panels) / cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.0 * nrows), squeeze=False)
        for ax, key in zip(axes.flat, panels):
            for name in (key, f"val_{key}"):
                points = [(r["step"], r[name]) for r in self.rows if isinstance(r.get(name), (int, float))]
                if not points:
                    continue
                xs, ys = zip(*points)
                sparse = len(points) < 30 or len(points) < len(self.rows) / 2  # e.g. val metrics, only at checkpoints
                ax.plot(xs, ys, "o-" if sparse else "-", markersize=3, linewidth=1, label="val" if name != key else "train")
            if any(f"val_{key}" in r for r in self.rows):
                ax.legend(fontsize=7)
            ax.set_title(key, fontsize=9)
            ax.set_xlabel("step", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(panels) :]:
            ax.axis("off")
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=90)
        plt.close(fig)
        storage.write_bytes(storage.join(self.run_dir, "loss.png"), buf.getvalue())

    # -------------------------------------------------------------- samples, best

    def save_samples(self, step: int, image) -> str:
        """Write the PIL sample grid to samples/step-XXXXXX.png; returns its URI."""
        from genart.data.images import encode_png

        uri = storage.join(self.run_dir, "samples", f"{checkpoint_name(step)}.png")
        storage.write_bytes(uri, encode_png(image))
        return uri

    def update_best(self, step: int, metrics: dict, metric: str | None, mode: str) -> bool:
        """Point best.json at this checkpoint if `metric` improved or tied; True if it did.

        A tie goes to the newer checkpoint, as in Ray's CheckpointConfig ranking, so best.json always names the
        checkpoint Ray ranks first (and so keeps)."""
        value = metrics.get(metric) if metric else None
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        if self.best and self.best.get("metric") == metric:
            old = self.best["value"]
            if (value > old) if mode == "min" else (value < old):
                return False
        self.best = {"checkpoint": checkpoint_name(step), "metric": metric, "value": float(value), "mode": mode, "step": step}
        storage.write_text(storage.join(self.run_dir, "best.json"), json.dumps(self.best, indent=1) + "\n")
        return True


def _metric_keys(rows: list[dict]) -> list[str]:
    keys: dict[str, None] = {}
    for row in rows:
        for key, value in row.items():
            if key not in BOOKKEEPING and isinstance(value, (int, float)):
                keys[key] = None
    return list(keys)
