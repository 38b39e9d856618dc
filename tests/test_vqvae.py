"""The vqvae family: its EMA codebook (the same on every DDP rank), its two training phases, the dihedral
augmentation it ships with, one real two-worker Ray Train fit, and real HTTP against Serve.

    PYTHONPATH=$PWD /work/main/.venv/bin/python -m pytest tests/test_vqvae.py -q
"""

from __future__ import annotations

import io
import json
import math
import os

import numpy as np
import pytest
import torch

from genart import models
from genart.errors import UserError
from genart.models.checkpoint import read_state, save_checkpoint
from genart.models.tiny import tiny_checkpoint, tiny_config, tiny_nets
from genart.models.vqvae import Codebook
from genart.serve.inference import to_uint8
from genart.runtime import free_port
from helpers import check_served_generate, generated_frames, one_thread, served  # noqa: F401  (one_thread: autouse, one torch thread in this module)

FAMILY = models.REGISTRY["vqvae"]


def clustered(n: int, seed: int) -> torch.Tensor:
    """(n, 4) vectors around 3 centres: a 16-entry codebook has dead entries to restart."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[4.0, 0, 0, 0], [0, 4.0, 0, 0], [0, 0, 4.0, 0]])
    return centres[torch.randint(0, 3, (n,), generator=g)] + 0.1 * torch.randn(n, 4, generator=g)


def _rank(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(rank)  # each rank draws its own restart candidates: rank 0's must win
    book = Codebook(16, 4, decay=0.5)  # a short memory: entries die within a few steps
    for step in range(12):
        flat = clustered(64, seed=100 * step + rank)  # each rank its own batch
        book.update(flat, book.assign(flat) if bool(book.started) else torch.zeros(64, dtype=torch.long))
    torch.save({k: v.clone() for k, v in book.state_dict().items()}, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_codebook_is_the_same_on_every_rank(tmp_path):
    """Two gloo processes, each with its own batches: all-reduced EMA statistics and rank 0's restarts leave one
    codebook (without them each rank drifts to its own; DDP's buffer broadcast only repairs that a step late)."""
    import torch.multiprocessing as mp

    mp.spawn(_rank, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert (a["usage"] > 0).all() and bool(a["started"])


def test_codebook_entries_follow_their_vectors_and_dead_ones_restart():
    """Entries are the means of what they are assigned; when the data moves away, the stranded entries die and
    restart on the new data (an entry nobody picks would otherwise stay where it was for ever)."""
    torch.manual_seed(0)
    book = Codebook(16, 4, decay=0.5)

    def feed(shift: float, steps: int) -> None:
        for step in range(steps):
            flat = clustered(256, seed=step) + shift
            book.update(flat, book.assign(flat) if bool(book.started) else torch.zeros(256, dtype=torch.long))

    feed(0.0, 10)
    feed(10.0, 20)  # every cluster moves by 10 in each coordinate
    flat = clustered(512, seed=99) + 10.0
    error = (book.entries[book.assign(flat)] - flat).pow(2).sum(1).mean()
    assert error < 0.1, error  # every vector has an entry near it (the noise alone is 4 x 0.01)
    nearest = torch.cdist(book.entries, flat).min(1).values  # (16,): each entry's distance to the new data
    assert (nearest < 1.0).all(), nearest  # none left at the old clusters, ~20 away


def test_codebook_runs_in_fp32_under_autocast():
    """A GPU trains (and serves) under bf16 autocast: the codebook's distances and EMA step stay fp32 (its EMA step
    used to fail on a bf16 matmul result at step 0, and bf16 distances pick wrong entries)."""
    torch.manual_seed(0)
    book = Codebook(16, 4, decay=0.5)
    flat = clustered(256, seed=1)
    book.update(flat, torch.zeros(256, dtype=torch.long))
    exact = book.assign(flat)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the same casting rule for matmul as CUDA's
        assert torch.equal(book.assign(flat), exact)
        book.update(flat, exact)
    assert book.entries.dtype == book.sums.dtype == torch.float32


def test_dihedral_augment_draws_all_eight_views():
    from genart.train.augment import augment_batch

    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    views = [v for k in range(4) for v in (x.rot90(k, (2, 3)), x.rot90(k, (2, 3)).flip(3))]  # the eight, per image
    seen = [set(), set()]
    gen = torch.Generator().manual_seed(0)
    for _ in range(100):
        out = augment_batch(x, "dihedral", gen)
        for i in range(2):
            match = [j for j, v in enumerate(views) if torch.equal(out[i], v[i])]
            assert len(match) == 1  # always one of the eight views, never a mix
            seen[i].add(match[0])
    assert seen == [set(range(8))] * 2


def test_window_means_each_metric_over_the_steps_that_reported_it():
    """A window that spans the vqvae's switch to its prior: 2 steps of `loss`, then 3 of `prior_loss`."""
    from genart.train.loop import _Window

    window = _Window()
    for value in (1.0, 3.0):
        window.add({"loss": value})
    for value in (4.0, 5.0, 6.0):
        window.add({"prior_loss": value})
    assert window.means(world=1, device=torch.device("cpu")) == {"loss": 2.0, "prior_loss": 5.0}


def _state(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def test_each_phase_trains_its_own_net():
    """Steps before prior_start_step move the VQ-VAE (weights and codebook) and leave the prior; later ones the reverse."""
    cfg = tiny_config("vqvae", prior_start_step=2, conditional=True)
    torch.manual_seed(0)
    nets = FAMILY.build(cfg, 16, 3)
    opts = FAMILY.optimizers(cfg, nets)
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.rand(8, 3, 16, 16, generator=g) * 2 - 1, "label": torch.randint(0, 3, (8,), generator=g)}
    for step, trained in ((0, "vqvae"), (1, "vqvae"), (2, "prior"), (3, "prior")):
        before = {name: _state(net) for name, net in nets.items()}
        metrics = FAMILY.train_step(cfg, nets, opts, batch, step)
        assert set(metrics) == ({"loss", "recon_mse", "commit", "codes_used"} if trained == "vqvae" else {"prior_loss"})
        for name, net in nets.items():
            changed = any(not torch.equal(v, before[name][k]) for k, v in net.state_dict().items())
            assert changed == (name == trained), (step, name)
    assert metrics["prior_loss"] < math.log(cfg.codebook_size) + 0.5  # about the uniform guess after 2 steps


@pytest.mark.slow
def test_fit_on_two_workers_then_load_sample_complete_reconstruct(tmp_path, ray_session, synth_dir):
    """One real Ray Train fit (2 workers, DDP): the VQ-VAE phase lowers the reconstruction error, the prior phase
    the token loss; the loaded model samples, completes and reconstructs."""
    from genart.config import validate
    from genart.data.prepare import PrepareOptions, prepare
    from genart.train import outputs
    from genart.train.config import TrainConfig
    from genart.train.trainer import train

    data = str(tmp_path / "synth16")
    prepare([synth_dir], data, PrepareOptions(size=16, val_fraction=0.2), progress=False)
    cfg = validate(TrainConfig, {
        # lr and a short EMA memory (dead entries restart within ~12 steps) for a codebook that settles in 60 steps
        "model": {"family": "vqvae", "codebook_size": 16, "code_dim": 8, "channels": 16, "res_blocks": 1, "lr": 5e-3,
                  "ema_decay": 0.8, "prior_start_step": 60, "prior_steps": 40, "prior_embed_dim": 16, "prior_layers": 1, "prior_heads": 2,
                  "prior_warmup_steps": 5, "prior_dropout": 0.0, "conditional": True, "grid_size": 8,
                  "label_dropout": 0.2, "guidance": 1.5},  # classifier-free guidance: trained for, and sampled with
        "data": {"path": data, "batch_size": 16, "augment": "dihedral"},
        "train": {"max_steps": 100, "checkpoint_every_steps": 50, "log_every_steps": 10, "keep_last": 2},
        "scaling": {"num_workers": 2, "cpus_per_worker": 1},
        "run": {"storage": str(tmp_path / "runs"), "name": "vq"},
    })
    summary = train(cfg)
    rows = outputs.read_metrics(summary["run_dir"])
    vq_rows = [r for r in rows if "recon_mse" in r]
    prior_rows = [r for r in rows if "prior_loss" in r]
    assert [r["step"] for r in vq_rows] == [10, 20, 30, 40, 50, 60] and [r["step"] for r in prior_rows] == [70, 80, 90, 100]
    # 60 steps of a 16-channel net: the error falls by ~20-30 % (0.36 -> 0.29 in one CI run, -> 0.26 in others)
    assert vq_rows[-1]["recon_mse"] < 0.9 * vq_rows[0]["recon_mse"], vq_rows
    assert prior_rows[-1]["prior_loss"] < prior_rows[0]["prior_loss"] < math.log(16) + 0.5, prior_rows
    val = {r["step"]: r for r in rows if "val_prior_loss" in r}
    assert val[100]["val_prior_loss"] < val[50]["val_prior_loss"], val  # at step 50 the prior had not trained
    assert outputs.read_best(summary["run_dir"])["checkpoint"] == "step-000100"  # the latest: the prior trains last

    model = models.load(summary["run_dir"], family="vqvae")
    assert model.family == "vqvae" and model.num_labels == 5 and model.latent_dim == 16  # a 4x4 token map
    samples = model.sample([0, 1, 2, 3, 4])
    assert samples.shape == (5, 3, 16, 16) and torch.equal(samples, model.sample([0, 1, 2, 3, 4]))
    assert model.nets["model"].null_label == 5  # the "no genre" start token after the five genres
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    kept = model.complete(x, seeds=[7, 8], rows=16)  # every row kept: the reconstruction at the model's size
    assert torch.equal(kept, model.reconstruct(x))
    assert torch.equal(model.complete(x, seeds=[7, 8], rows=0), model.sample([7, 8], labels=[7 % 5, 8 % 5]))
    # rows are rounded down to whole token rows (4 px here): 4 and 7 keep one token row, 8 keeps two
    assert torch.equal(model.complete(x, seeds=[7, 8], rows=4), model.complete(x, seeds=[7, 8], rows=7))
    assert not torch.equal(model.complete(x, seeds=[7, 8], rows=4), model.complete(x, seeds=[7, 8], rows=8))
    wide = torch.rand(1, 3, 20, 36)
    assert model.reconstruct(wide).shape == wide.shape


@pytest.fixture(scope="module")
def guided_ckpt(tmp_path_factory) -> str:
    """A tiny conditional vqvae trained for guidance (label_dropout), its prior's embeddings scaled up and its codebook
    entries spread out: four steps leave the embeddings near their init (guidance would change no token) and the
    entries close together (different tokens would decode to the same pixels)."""
    ckpt = tiny_checkpoint(str(tmp_path_factory.mktemp("vq") / "run"), "vqvae", 16, ["a", "b", "c"], seed=3, train_steps=4,
                           conditional=True, label_dropout=0.3)
    model, step = models.load(ckpt), os.path.join(ckpt, "step-000004")
    with torch.no_grad():
        model.nets["model"].start.weight.mul_(100)
        model.nets["model"].token.weight.mul_(30)  # the output head too (tied): logits of a few units, not ~0
        model.nets["vqvae"].codebook.entries.normal_(0, 1, generator=torch.Generator().manual_seed(0))
    save_checkpoint(step, {"vqvae": model.nets["vqvae"], "prior": model.nets["model"]}, {}, read_state(step))
    return ckpt


def test_model_card_says_whether_and_how_a_model_is_guided(tmp_path):
    """/v1/models' card: guidance_trained by the same rule the nets use, and the model's own scale, 0 included (an
    `or 1.0` once turned a config's guidance 0, sampling from the "no class" logits alone, into 1)."""
    from genart.serve.app import model_card

    unguided = tiny_checkpoint(str(tmp_path / "plain"), "vqvae", 16, ["a", "b"], conditional=True)
    zero = tiny_checkpoint(str(tmp_path / "zero"), "vqvae", 16, ["a", "b"], conditional=True, label_dropout=0.2, guidance=0.0)
    assert (model_card("plain", unguided)["guidance_trained"], model_card("plain", unguided)["guidance"]) == (False, 1.0)
    card = model_card("zero", zero)
    assert (card["guidance_trained"], card["guidance"]) == (True, 0.0)
    assert models.load(zero).guidance_trained is True and models.load(unguided).guidance_trained is False


def test_generate_job_takes_guidance(guided_ckpt, tmp_path, ray_session):
    """`genart generate --guidance`: the images of .sample(guidance=...), recorded in images.jsonl; refused, before
    any Ray job, for a model that was not trained for it or takes none."""
    from genart.infer.jobs import RunOptions, generate

    run = RunOptions(batch_size=4, concurrency=1, progress=False)
    out = tmp_path / "g"
    generate(guided_ckpt, 6, str(out), seed=2, label="b", guidance=2.5, run=run)
    records = [json.loads(line) for line in (out / "images.jsonl").read_text().splitlines()]
    assert len(records) == 6 and {r["guidance"] for r in records} == {2.5}
    model = models.load(guided_ckpt)
    seeds = [r["latent_seed"] for r in records]
    want = to_uint8(model.sample(seeds, labels=[1] * 6, guidance=2.5))
    from PIL import Image

    got = np.stack([np.asarray(Image.open(out / r["file"])) for r in records])
    assert np.array_equal(got, want)
    assert not np.array_equal(want, to_uint8(model.sample(seeds, labels=[1] * 6)))
    plain = tiny_checkpoint(str(tmp_path / "plain"), "vqvae", 16, ["a", "b", "c"], conditional=True)
    with pytest.raises(UserError, match="label_dropout > 0"):
        generate(plain, 2, str(tmp_path / "p"), guidance=2.0, run=run)
    dcgan = tiny_checkpoint(str(tmp_path / "dcgan"), "dcgan", 16, latent_dim=8, base_channels=4)
    with pytest.raises(UserError, match="takes no guidance"):
        generate(dcgan, 2, str(tmp_path / "d"), guidance=1.5, run=run)
    with pytest.raises(UserError, match="takes no guidance"):  # the same rule in .sample itself
        models.load(dcgan).sample([0], guidance=1.5)
    assert not (tmp_path / "p").exists() and not (tmp_path / "d").exists()


def test_served_generate_reconstruct_and_complete(ray_session, tmp_path, guided_ckpt):
    """Real HTTP against Serve: /v1/generate (the pixels of .sample, with and without a per-request guidance),
    /v1/reconstruct and /v1/complete take a vqvae."""
    import requests
    from PIL import Image

    ckpt = guided_ckpt
    model = models.load(ckpt)
    with served({"tokens": ckpt}, "t-vq") as base:
        check_served_generate(base, model, "tokens")
        card = requests.get(base + "/v1/models", timeout=30).json()["models"][0]
        assert card["guidance_trained"] is True and card["guidance"] == 1.0  # trained for it, samples unguided by default
        reply, frames = generated_frames(base, n=8, seed=5, label="b", guidance=2.5)
        assert reply["guidance"] == 2.5
        seeds = list(range(5, 13))
        want = to_uint8(model.sample(seeds, labels=[1] * 8, guidance=2.5))
        plain = to_uint8(model.sample(seeds, labels=[1] * 8))
        assert np.array_equal(frames, want) and not np.array_equal(frames, plain)
        too_much = requests.post(base + "/v1/generate", json={"n": 1, "guidance": 11}, timeout=60)
        assert too_much.status_code == 422, too_much.text
        picture = np.zeros((24, 40, 3), np.uint8)
        picture[:, :20] = (200, 30, 30)
        buf = io.BytesIO()
        Image.fromarray(picture).save(buf, "PNG")
        upload = {"image": ("x.png", buf.getvalue(), "image/png")}
        rec = requests.post(base + "/v1/reconstruct", files=upload, timeout=60)
        assert rec.status_code == 200, rec.text
        out = np.asarray(Image.open(io.BytesIO(rec.content)))
        x = torch.from_numpy(picture).permute(2, 0, 1)[None].float() / 255
        want = (model.reconstruct(x)[0].permute(1, 2, 0) * 255 + 0.5).to(torch.uint8).numpy()
        assert out.shape == (24, 40, 3) and np.abs(out.astype(int) - want.astype(int)).max() <= 1
        done = requests.post(base + "/v1/complete", files=upload, data={"seed": "1", "label": "c"}, timeout=60)
        assert done.status_code == 200, done.text
        assert np.asarray(Image.open(io.BytesIO(done.content))).shape == (16, 16, 3)


def test_shipped_config_is_valid_and_its_phases_add_up():
    from genart.train.config import load_config

    path = os.path.join(os.path.dirname(__file__), "..", "workflows", "configs", "vqvae.yaml")
    cfg = load_config(path, [])
    assert cfg.model.family == "vqvae" and cfg.data.augment == "dihedral"
    assert cfg.train.max_steps == cfg.model.prior_start_step + cfg.model.prior_steps
    nets = tiny_nets(cfg.model, cfg.data.image_size, ["a", "b"])
    assert nets["prior"].size == cfg.data.image_size // 4  # an 8x8 token map at 32 px
