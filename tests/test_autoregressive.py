"""The autoregressive family: KV-cache sampling == uncached sampling, causality, completion, palette k-means and file,
`genart palette` as a Ray Data job, and one real Ray Train fit that resumes, generates and loads.

    PYTHONPATH=$PWD /work/main/.venv/bin/python -m pytest tests/test_autoregressive.py -q
"""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from genart import models
from genart.cli import main
from genart.data.palette import fit_palette, from_tokens, grid_palette, kmeans, read_palette, to_tokens
from genart.errors import UserError
from genart.data.synth import GENRES
from genart.models.autoregressive import drop_labels, pick, sample_tokens, uniforms
from genart.models.sampling import check_guidance
from genart.models.tiny import tiny_config, tiny_nets
from helpers import check_served_generate, one_thread, served  # noqa: F401  (one_thread: autouse, one torch thread in this module)

FAMILY = models.REGISTRY["autoregressive"]
BACKBONES = ["transformer", "lstm"]


def tiny_net(backbone: str, size: int = 8, labels: int = 3, **overrides):
    """(config, net) of genart.models.tiny at this module's widths, after a few real steps, so the weights are not
    the near-uniform initial ones."""
    cfg = tiny_config("autoregressive", backbone=backbone, embed_dim=16, num_layers=2, num_heads=2, colors=8,
                      conditional=labels > 0, **overrides)
    nets = tiny_nets(cfg, size, GENRES[:labels], train_steps=3, inference=True)
    return cfg, nets["model"].eval()


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("top_k", [0, 3])
def test_cached_sampling_equals_uncached(backbone, top_k):
    _, net = tiny_net(backbone)
    noise, labels = uniforms([3, 4, 5], 64), torch.tensor([0, 1, 2])
    cached = sample_tokens(net, noise, labels, temperature=1.3, top_k=top_k, cache=True)
    uncached = sample_tokens(net, noise, labels, temperature=1.3, top_k=top_k, cache=False)
    assert torch.equal(cached, uncached)
    assert len(set(cached.flatten().tolist())) > 1  # really sampled, not one colour everywhere
    with torch.no_grad():  # the stepwise logits are the full forward's, position by position
        full = net(cached, labels)
        state, steps = None, []
        for t in range(64):
            logits, state = net.step(cached[:, t - 1] if t else None, t, labels, state, 3)
            steps.append(logits)
    assert torch.allclose(torch.stack(steps, 1), full, atol=1e-5)


def test_classifier_free_guidance_samples_from_the_guided_logits():
    _, net = tiny_net("transformer", label_dropout=0.5)
    with torch.no_grad():  # three steps leave the start tokens near their init: make the classes differ
        net.start.weight.copy_(torch.randn(net.start.weight.shape, generator=torch.Generator().manual_seed(4)))
    noise, labels = uniforms([3, 4, 5, 6], 64), torch.tensor([0, 1, 2, 0])
    guided = sample_tokens(net, noise, labels, temperature=1.3, top_k=0, guidance=2.5)
    assert torch.equal(guided, sample_tokens(net, noise, labels, temperature=1.3, top_k=0, guidance=2.5, cache=False))
    with torch.no_grad():  # every token is the inverse-CDF pick from uncond + 2.5 (cond - uncond) given the ones before
        cond, uncond = net(guided, labels), net(guided, torch.full_like(labels, net.null_label))
    expected = [pick(uncond[:, t] + 2.5 * (cond[:, t] - uncond[:, t]), noise[:, t], 1.3, 0) for t in range(64)]
    assert torch.equal(torch.stack(expected, 1), guided)
    plain = sample_tokens(net, noise, labels, temperature=1.3, top_k=0)
    assert torch.equal(sample_tokens(net, noise, labels, temperature=1.3, top_k=0, guidance=1.0), plain)
    assert not torch.equal(guided, plain)

    # training: about label_dropout of the labels become the "no class" token (the last start token), the rest stay
    many = torch.arange(3000) % 3
    dropped = drop_labels(net, many, 0.5)
    null = dropped == net.null_label
    assert net.null_label == 3 and net.start.num_embeddings == 4 and 0.45 < null.float().mean() < 0.55
    assert torch.equal(dropped[~null], many[~null])
    _, plain_net = tiny_net("transformer")  # trained without label dropout: no "no class" token, so no guidance
    assert plain_net.null_label is None and torch.equal(drop_labels(plain_net, many, 0.5), many)
    with pytest.raises(UserError, match="label_dropout"):
        sample_tokens(plain_net, noise, labels, temperature=1.0, top_k=0, guidance=2.0)
    with pytest.raises(ValueError, match="label_dropout > 0"):  # a config asking for guidance must train for it
        tiny_config("autoregressive", conditional=True, guidance=2.0)
    # the per-request rule (generate --guidance, /v1/generate): None = the model's own, 1 = off for any token model
    assert check_guidance(None, "dcgan", False) is None and check_guidance(1, "autoregressive", False) == 1.0
    for bad, family, trained in ((11, "vqvae", True), (-1, "vqvae", True), (1.5, "vae", True), (1.5, "autoregressive", False)):
        with pytest.raises(UserError):
            check_guidance(bad, family, trained)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_changing_a_later_token_leaves_earlier_logits_alone(backbone):
    _, net = tiny_net(backbone)
    tokens = torch.randint(0, 8, (2, 64), generator=torch.Generator().manual_seed(2))
    changed = tokens.clone()
    changed[:, 30] = (changed[:, 30] + 1) % 8
    with torch.no_grad():
        before, after = net(tokens, torch.tensor([0, 1])), net(changed, torch.tensor([0, 1]))
    assert torch.equal(before[:, :31], after[:, :31])  # logits at t see tokens < t only: 0..30 cannot know token 30
    assert not torch.allclose(before[:, 31:], after[:, 31:])  # ... and the ones after it do
    other_class = net(tokens, torch.tensor([2, 2]))
    assert not torch.allclose(other_class[:, 0], before[:, 0])  # the class token conditions the first pixel


def test_sampling_completion_and_interpolation_of_a_loaded_model():
    cfg, net = tiny_net("transformer", labels=0)
    model = FAMILY.inference(cfg, {"model": net}, {"image_size": 8, "label_names": []})
    a, b = model.sample([11, 12]), model.sample([11, 12])
    assert torch.equal(a, b) and a.shape == (2, 3, 8, 8) and not torch.equal(a[0], a[1])
    assert torch.equal(model.sample([12])[0], a[1])  # independent of the rest of the batch
    assert torch.equal(model.sample([11], cache=False), a[:1])
    # every pixel is a palette colour
    assert torch.equal(from_tokens(to_tokens(a, model.palette), model.palette, 8), a)

    images = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    done = model.complete(images, seeds=[1, 2])
    quantised = from_tokens(to_tokens(images, model.palette), model.palette, 8)
    assert torch.equal(done[:, :, :4], quantised[:, :, :4])  # the top half is the given image, exactly
    assert not torch.equal(done[:, :, 4:], quantised[:, :, 4:])
    assert torch.equal(model.complete(images, seeds=[1, 2], rows=8), quantised)
    with pytest.raises(UserError, match="rows"):
        model.complete(images, seeds=[1, 2], rows=9)

    walk = model.interpolate(11, 12, 5)
    assert walk.shape == (5, 3, 8, 8) and torch.equal(walk[0], a[0]) and torch.equal(walk[-1], a[1])
    assert torch.equal(walk[1, :, :2], a[0, :, :2])  # frame 1 keeps seed 11's first 48 pixels: its top rows
    with pytest.raises(UserError, match="not class-conditional"):
        model.sample([1], labels=[0])


def test_a_completion_without_a_label_continues_the_pictures_own_class():
    """Without labels, a class-conditional model completed every picture as the seed's default class (class 0 for
    seed 0, the API's default), whatever its kept rows showed; the training grid completes with the true labels.
    It now takes the class under which the kept rows are likeliest. Trained here for real (train_step) on two
    classes of 8 px pictures, black over red (class 0) and white over blue (class 1). (In pictures this simple the
    kept rows alone already decide the colours below, so the completions were right before too; what a wrong
    class does to a genre's structure needs a real model to show.)"""
    cfg = tiny_config("autoregressive", backbone="transformer", embed_dim=16, num_layers=1, num_heads=2, colors=8,
                      conditional=True, lr=0.01, warmup_steps=0)
    nets = FAMILY.build(cfg, 8, 2)
    opts = FAMILY.optimizers(cfg, nets)
    colour = lambda rgb: torch.tensor(rgb, dtype=torch.float32)[:, None, None].expand(3, 4, 8)  # noqa: E731
    kinds = [torch.cat([colour((0, 0, 0)), colour((1, 0, 0))], 1), torch.cat([colour((1, 1, 1)), colour((0, 0, 1))], 1)]
    labels = torch.tensor([0, 1] * 8)
    images = torch.stack([kinds[int(k)] for k in labels]) * 2 - 1
    for step in range(80):
        FAMILY.train_step(cfg, nets, opts, {"image": images, "label": labels}, step)
    model = FAMILY.inference(cfg, {"model": nets["model"].eval()}, {"image_size": 8, "label_names": ["dark", "light"]})
    pictures = torch.stack([kinds[1], kinds[0]])  # seeds 0 and 1 default to the other class
    assert model.likeliest_labels(model.tokens(pictures)[:, :32]).tolist() == [1, 0]
    assert torch.equal(model.complete(pictures, seeds=[0, 1]), pictures)  # blue under white, red under black
    # nothing kept (rows=0): each seed's own class, as sample draws (every class scored 0 and argmin gave class 0)
    assert torch.equal(model.complete(pictures, seeds=[0, 1], rows=0), model.sample([0, 1]))


def test_kmeans_finds_the_colours_and_palette_file_round_trip(tmp_path):
    true = torch.tensor([[0.9, 0.1, 0.1], [0.1, 0.8, 0.2], [0.1, 0.1, 0.9], [0.95, 0.95, 0.95]])
    g = torch.Generator().manual_seed(0)
    pixels = true[torch.randint(0, 4, (4000,), generator=g)] + 0.02 * torch.randn(4000, 3, generator=g)
    centers, error = kmeans(pixels, 4, seed=0)
    assert error < 0.002
    assert torch.cdist(true, centers).min(1).values.max() < 0.02  # every true colour found
    again, _ = kmeans(pixels, 4, seed=0)
    assert torch.equal(centers, again)  # fixed seed: the same palette

    path = tmp_path / "palette-4.json"
    path.write_text(json.dumps({"colors": (centers * 255).round().int().tolist()}))
    palette = read_palette(str(path), 4)
    image = from_tokens(torch.randint(0, 4, (2, 36), generator=g), palette, 6)  # (2, 3, 6, 6) in palette colours
    assert torch.equal(from_tokens(to_tokens(image, palette), palette, 6), image)
    with pytest.raises(UserError, match="model.colors is 8"):
        read_palette(str(path), 8)
    path.write_text(json.dumps({"colors": [[0, 0]]}))
    with pytest.raises(UserError, match="colours of 3 values"):
        read_palette(str(path))
    with pytest.raises(UserError, match="genart palette"):
        read_palette(str(tmp_path / "missing.json"))
    assert grid_palette(16).shape == (16, 3) and len({tuple(c) for c in grid_palette(16).tolist()}) == 16


@pytest.fixture(scope="module")
def dataset16(tmp_path_factory, ray_session):
    from genart.data.prepare import PrepareOptions, prepare
    from genart.data.synth import make_synth

    root = tmp_path_factory.mktemp("ar-data")
    make_synth(str(root / "raw"), num=120, size=16, seed=2)
    dest = str(root / "synth16")
    prepare([str(root / "raw")], dest, PrepareOptions(size=16, val_fraction=0.2), progress=False)
    return dest


def test_palette_command_fits_the_dataset(dataset16, tmp_path):
    result = CliRunner().invoke(main, ["palette", "--data", dataset16, "--colors", "8", "--sample-pixels", "5000"])
    assert result.exit_code == 0, result.output
    first = json.loads(open(f"{dataset16}/palette-8.json").read())
    assert len(first["colors"]) == 8 and first["pixels_sampled"] >= 5000 and first["rmse_255"] < 60
    other = fit_palette(dataset16, 8, out=str(tmp_path / "p.json"), sample_pixels=5000)
    assert json.loads((tmp_path / "p.json").read_text())["colors"] == first["colors"]  # deterministic by seed
    assert other["pixels_sampled"] == first["pixels_sampled"]
    bad = CliRunner().invoke(main, ["palette", "--data", dataset16, "--colors", "1"])
    assert bad.exit_code == 2 and "--colors 1" in bad.output


@pytest.mark.slow
def test_fit_resumes_generates_and_loads(dataset16, tmp_path):
    """Two real fits: a conditional transformer to step 8, then the same run resumed to 12; then genart generate."""
    from genart.config import validate
    from genart.infer import RunOptions, generate
    from genart.train.config import TrainConfig
    from genart.train.trainer import train

    fit_palette(dataset16, 8, sample_pixels=5000)  # idempotent; the palette the config's null palette resolves to

    def cfg(max_steps: int) -> TrainConfig:
        return validate(TrainConfig, {
            "model": {"family": "autoregressive", "colors": 8, "embed_dim": 16, "num_layers": 1, "num_heads": 2,
                      "conditional": True, "grid_size": 5, "warmup_steps": 2},
            "data": {"path": dataset16, "batch_size": 8},
            "train": {"max_steps": max_steps, "checkpoint_every_steps": 4, "log_every_steps": 2, "keep_last": 1},
            "scaling": {"num_workers": 2, "cpus_per_worker": 1},
            "run": {"storage": str(tmp_path / "runs"), "name": "ar"},
        })

    first = train(cfg(8))
    second = train(cfg(12))
    assert first["step"] == 8 and second["start_step"] == 8 and second["step"] == 12
    run_dir = second["run_dir"]
    rows = [json.loads(line) for line in open(f"{run_dir}/metrics.jsonl")]
    assert all(0 < r["bits_per_dim"] < 2 for r in rows)  # log2(8) / 3 = 1 bit per dim is the uniform guess
    assert {r["step"] for r in rows if "val_bits_per_dim" in r} == {4, 8, 12}
    assert {r["start_step"] for r in rows if r["step"] > 8} == {8}
    written = json.loads(open(f"{run_dir}/step-000012/state.json").read())["config"]["model"]["palette"]
    assert written == f"{dataset16}/palette-8.json"  # the resolved config names the palette it trained with

    model = models.load(run_dir, which="latest")
    assert model.family == "autoregressive" and model.meta["step"] == 12 and model.num_labels == 5
    assert torch.allclose(model.palette, read_palette(written), atol=1e-6)  # the palette travels in the weights
    out = str(tmp_path / "generated")
    generate(run_dir, 6, out, seed=4, run=RunOptions(batch_size=3, concurrency=1, progress=False))
    assert sorted(p.name for p in (tmp_path / "generated").glob("*.png")) == [f"seed4-{i:06d}.png" for i in range(6)]


def test_served_generate_complete_and_interpolate(ray_session, tmp_path):
    """Real HTTP against Serve: /v1/generate (the same pixels as .sample), /v1/complete, /v1/interpolate, errors."""
    import io

    import numpy as np
    import requests
    from PIL import Image

    from genart.models.tiny import tiny_checkpoint

    genres = ["a", "b", "c"]
    ckpt = tiny_checkpoint(str(tmp_path / "ar"), "autoregressive", 8, genres, seed=3, embed_dim=16, num_heads=2, colors=8,
                           conditional=True)
    model = models.load(ckpt)
    with served({"pixels": ckpt}, "t-ar") as base:
        check_served_generate(base, model, "pixels")

        picture = np.zeros((20, 20, 3), np.uint8)
        picture[:, :, 0] = 255  # a red square
        buf = io.BytesIO()
        Image.fromarray(picture).save(buf, "PNG")
        done = requests.post(base + "/v1/complete", files={"image": ("x.png", buf.getvalue(), "image/png")},
                             data={"seed": "1", "label": "2"}, timeout=60)
        assert done.status_code == 200, done.text
        out = np.asarray(Image.open(io.BytesIO(done.content)))
        red = (model.palette[to_tokens(torch.tensor([[[1.0]], [[0.0]], [[0.0]]])[None], model.palette)[0]] * 255 + 0.5).to(torch.uint8)
        assert out.shape == (8, 8, 3) and (out[:4] == red.numpy()).all()  # top half: the upload's nearest palette colour
        bad = requests.post(base + "/v1/complete", files={"image": ("x.png", buf.getvalue(), "image/png")},
                            data={"rows": "9"}, timeout=60)
        assert bad.status_code == 422 and "rows 9" in bad.json()["detail"]
        junk = requests.post(base + "/v1/complete", files={"image": ("x.png", b"not a png", "image/png")}, timeout=60)
        assert junk.status_code == 400
        walk = requests.post(base + "/v1/interpolate", json={"seed_a": 1, "seed_b": 2, "steps": 3}, timeout=60)
        assert walk.status_code == 200 and Image.open(io.BytesIO(walk.content)).size[1] >= 8


@pytest.mark.parametrize("backbone", BACKBONES)
def test_shipped_configs_are_valid_and_resolve_the_palette(backbone):
    import os

    from genart.train.config import load_config
    from genart.train.trainer import resolve

    path = os.path.join(os.path.dirname(__file__), "..", "workflows", "configs", f"autoregressive_{backbone}.yaml")
    cfg = load_config(path, ["data.path=/data/synth16"])
    assert cfg.model.family == "autoregressive" and cfg.model.backbone == backbone and cfg.data.image_size == 16
    assert resolve(cfg).model.palette == "/data/synth16/palette-16.json"
    assert resolve(load_config(path, ["data.path=/d", "model.palette=grid"])).model.palette == "grid"
