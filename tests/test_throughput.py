"""Throughput changes that must not change results: batched stylize vs one image at a time, error isolation inside
a batch, --concurrency parsing and an autoscaling actor pool (training throughput: bench/bench_train.py)."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pytest
import torch
from click.testing import CliRunner

from genart.cli import main
from genart.errors import UserError
from genart.infer import RunOptions, stages
from genart.models import family
from genart.infer.jobs import parse_concurrency
from genart.models.tiny import tiny_checkpoint
from test_infer import _encode, _outputs, _picture, _write_tree

# several sizes, each more than once, plus one image larger than the tile (48 px): it goes through tiling
SIZES = [(40, 30), (40, 30), (30, 52), (64, 40), (30, 52), (40, 30), (17, 33), (64, 40)]


@pytest.fixture(scope="module")
def style_ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "style", "style", 32, channels=8, num_res_blocks=1)


def _rows(sizes) -> pa.Table:
    rows = []
    for i, (w, h) in enumerate(sizes):
        pixels = np.asarray(_picture(100 + i, (w, h))).tobytes()
        rows.append({"source": f"img{i}", "key": f"img{i}.png", "error": None, "width": w, "height": h, "pixels": pixels})
    return pa.Table.from_pylist(rows, schema=stages.WORK_SCHEMA)


def _one_at_a_time(actor, table: pa.Table) -> list:
    return [actor(table.slice(i, 1)).column("pixels")[0].as_py() for i in range(table.num_rows)]


def test_batched_stylize_is_bit_identical_to_one_image_at_a_time(style_ckpt):
    """fp32 on CPU with --deterministic: batching by size changes the speed, never a byte."""
    actor = stages.StylizeActor(style_ckpt, threads=1, deterministic=True, tile=48, overlap=None)
    table = _rows(SIZES)
    batched = actor(table).column("pixels").to_pylist()
    assert all(p is not None for p in batched)
    assert batched == _one_at_a_time(actor, table)


def test_cpu_forward_passes_hold_a_cache_sized_share(style_ckpt, monkeypatch):
    """On a CPU a group of same-size images is split into passes of at most family.CPU_FORWARD_PIXELS (big batches run
    slower there); the split is by image size only and changes no byte."""
    monkeypatch.setattr(family, "CPU_FORWARD_PIXELS", 2 * 40 * 30)
    actor = stages.StylizeActor(style_ckpt, threads=1, deterministic=True, tile=0, overlap=None)
    passes = []
    forward = actor._forward
    actor._forward = lambda x: passes.append(len(x)) or forward(x)
    table = _rows([(40, 30)] * 5 + [(17, 33)] * 3)
    batched = actor(table).column("pixels").to_pylist()
    assert sorted(passes) == [1, 2, 2, 3]  # 40x30: 2 + 2 + 1 per pass; 17x33 (561 px): all 3 in one
    assert batched == _one_at_a_time(actor, table)


def test_critic_features_in_cpu_passes_match_one_pass(tmp_path, monkeypatch):
    """The critic extractor (genart index, evaluate, audit) splits a CPU batch the same way: same features."""
    from genart.evaluate.features import build_extractor

    critic = tiny_checkpoint(tmp_path / "critic", "critic", 16, label_names=("a", "b"))
    extractor = build_extractor(f"critic:{critic}", device="cpu")
    pixels = np.random.default_rng(0).integers(0, 256, (7, 16, 16, 3), dtype=np.uint8)
    whole = extractor(pixels)
    monkeypatch.setattr(family, "CPU_FORWARD_PIXELS", 3 * 16 * 16)  # passes of 3, 3 and 1
    np.testing.assert_allclose(extractor(pixels), whole, rtol=1e-5, atol=1e-6)
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
    probs, features = family.in_passes(extractor.model.predict_and_embed, x, "cpu")  # what genart score runs
    assert torch.equal(probs, extractor.model.predict(x)) and torch.equal(features, extractor.model.embed(x))


def test_default_batched_stylize_is_within_one_level(style_ckpt):
    """Without --deterministic, oneDNN may pick another convolution algorithm for another batch size: the float
    outputs then differ in the last bits, i.e. at most one 8-bit level in a written pixel."""
    actor = stages.StylizeActor(style_ckpt, threads=1, tile=48, overlap=None)
    assert actor.placement.autocast_dtype is None and not actor.placement.channels_last  # fp32, contiguous on a CPU by default
    table = _rows(SIZES)
    batched = actor(table).column("pixels").to_pylist()
    for a, b in zip(batched, _one_at_a_time(actor, table)):
        diff = np.abs(np.frombuffer(a, np.uint8).astype(int) - np.frombuffer(b, np.uint8).astype(int))
        assert diff.max() <= 1


def test_a_bad_row_in_a_batch_fails_alone(style_ckpt):
    actor = stages.StylizeActor(style_ckpt, threads=1, tile=0, overlap=None)
    table = _rows([(40, 30)] * 4).to_pylist()
    table[2]["pixels"] = table[2]["pixels"][:-7]  # wrong length for its size: cannot be reshaped
    table[3]["error"], table[3]["pixels"] = "not an image", None  # failed upstream: passed through untouched
    out = actor(pa.Table.from_pylist(table, schema=stages.WORK_SCHEMA)).to_pylist()
    assert [r["error"] is None for r in out] == [True, True, False, False]
    assert out[2]["error"].startswith("stylize failed") and out[3]["error"] == "not an image"
    good = actor(_rows([(40, 30)] * 2)).column("pixels").to_pylist()
    assert [out[0]["pixels"], out[1]["pixels"]] == good  # the retry one by one gave the same bytes


def test_concurrency_parsing():
    assert parse_concurrency("3") == 3 and parse_concurrency("1-4") == (1, 4) and parse_concurrency("2-2") == 2
    assert RunOptions(concurrency=(1, 4)).pool_size == (1, 4) and RunOptions(concurrency=2).pool_size == (2, 2)
    for bad in ("0", "4-1", "x", "1-", "-2", "1-2-3"):
        with pytest.raises(UserError, match="--concurrency"):
            parse_concurrency(bad)


def test_a_zero_batch_size_is_refused_not_replaced_by_the_default(tmp_path, style_ckpt):
    """--batch-size 0 once fell through `or` to the default; the option's rule refuses it before Ray starts, and so
    is a negative --stall-timeout (every batch command has one)."""
    for command in (["stylize", "--model", style_ckpt], ["score", "--model", style_ckpt]):
        result = CliRunner().invoke(main, [*command, "--input", str(tmp_path), "--output", str(tmp_path / "out"),
                                           "--batch-size", "0"])
        assert result.exit_code == 2 and "--batch-size must be >= 1" in result.output
    for command in (["stylize", "--model", style_ckpt, "--input", str(tmp_path)], ["index", "--input", str(tmp_path)],
                    ["generate", "--model", style_ckpt, "--num", "4"]):
        result = CliRunner().invoke(main, [*command, "--output", str(tmp_path / "out"), "--stall-timeout", "-1"])
        assert result.exit_code == 2, result.output
        assert result.output.strip().splitlines()[-1].endswith("--stall-timeout -1.0: must be >= 0 seconds (0: wait forever)")


def test_stylize_cli_with_an_autoscaling_pool(tmp_path, style_ckpt, ray_session):
    """--concurrency 1-2 builds ActorPoolStrategy(min_size=1, max_size=2); every input is written or reported."""
    src, out = tmp_path / "in", tmp_path / "out"
    files = {f"p{i:02d}.png": _encode(_picture(i, SIZES[i % len(SIZES)]), "PNG") for i in range(12)}
    files["broken.png"] = b"not a png"
    _write_tree(str(src), files)
    result = CliRunner().invoke(main, ["stylize", "--model", style_ckpt, "--input", str(src), "--output", str(out),
                                       "--concurrency", "1-2", "--batch-size", "4", "--deterministic"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"] == {"inputs": 13, "written": 12, "errors": 1, "already_done": 0, "written_this_run": 12}
    assert len(_outputs(str(out))) == 12
    bad = CliRunner().invoke(main, ["stylize", "--model", style_ckpt, "--input", str(src), "--output", str(tmp_path / "x"),
                                    "--concurrency", "3-1"])
    assert bad.exit_code == 2 and "--concurrency 3-1" in bad.output


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_line_on_a_terminal_only():
    from genart.infer import output

    statuses = pa.table({"source": ["a", "b", "c"], "key": ["a", "b", "c"], "error": [None, "decode failed: x", None]},
                        schema=stages.STATUS_SCHEMA)
    for stream, shown in ((_Terminal(), True), (io.StringIO(), False)):
        tally, progress = output.Tally(), output.Progress("stylize", 10, stream=stream, min_interval_s=0)
        tally.add(statuses)
        progress.update(tally, statuses.num_rows)
        progress.close()
        text = stream.getvalue()
        assert (("stylize: 3/10" in text and "1 errors" in text and "ETA" in text) if shown else text == ""), text
