"""The `genart` command: parses flags, then calls one function per subcommand. No logic lives here."""

from __future__ import annotations

import sys

import click

from genart import __version__
from genart.errors import UserError


class _Group(click.Group):
    """Turns a UserError into one line on stderr and exit code 2; other exceptions keep their traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UserError as exc:
            click.echo(f"genart: error: {exc}", err=True)
            sys.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="genart")
def main() -> None:
    """Train, batch-run and serve generative-art models on Ray.

    Without --address (or RAY_ADDRESS) every command starts an embedded local Ray sized for this machine.
    """


address_option = click.option(
    "--address", envvar="RAY_ADDRESS", default=None, help="Ray cluster address (default: start an embedded local Ray)."
)
set_option = click.option(
    "--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config key, e.g. --set train.max_steps=100."
)


# ---------------------------------------------------------------- data


@main.command()
@click.argument("srcs", nargs=-1, required=True, metavar="SRC...")
@click.option("--out", "dest", required=True, help="Destination folder or s3:// prefix for the Parquet dataset.")
@click.option("--size", type=int, default=None, help="Resize to SIZE x SIZE px (default: keep the normalised original size).")
@click.option("--resize", "resize_mode", type=click.Choice(["crop", "pad"]), default="crop", show_default=True,
              help="How --size makes images square: center-crop, or pad with white.")
@click.option("--labels", type=click.Choice(["dirs", "none"]), default=None,
              help="Label by first-level folder (default when SRC has subfolders) or not at all.")
@click.option("--val-fraction", type=float, default=0.05, show_default=True, help="Share of images in the val split.")
@click.option("--shard-rows", type=int, default=10_000, show_default=True, help="Rows per Parquet shard.")
@click.option("--max-pixels", type=int, default=None, help="Reject images with more pixels (default: Pillow's 89.5 MP).")
@click.option("--overwrite", is_flag=True, help="Replace a dataset already at --out.")
@address_option
def prepare(srcs, dest, size, resize_mode, labels, val_fraction, shard_rows, max_pixels, overwrite, address):
    """Turn raw images (folders, .zip/.tar archives, Parquet, s3:// prefixes) into a validated, deduplicated,
    sharded Parquet dataset with manifest.json and rejected.jsonl."""
    from genart import runtime
    from genart.data import images
    from genart.data.prepare import PrepareOptions, prepare as run_prepare, summary

    runtime.init(address)
    opts = PrepareOptions(size=size, resize_mode=resize_mode, labels=labels, val_fraction=val_fraction,
                          shard_rows=shard_rows, max_pixels=max_pixels or images.DEFAULT_MAX_PIXELS, overwrite=overwrite)
    manifest = run_prepare(list(srcs), dest, opts)
    click.echo(summary(manifest))
    click.echo(f"dataset: {dest}")


@main.group()
def datasets() -> None:
    """Sample datasets that need no network."""


@datasets.command("synth")
@click.option("--out", required=True, help="Folder to write <genre>/<genre>-NNNNN.png into.")
@click.option("--num", type=int, default=500, show_default=True, help="Number of images, spread over the genres.")
@click.option("--size", type=int, default=64, show_default=True, help="Image side in px.")
@click.option("--seed", type=int, default=0, show_default=True)
def datasets_synth(out, num, size, seed):
    """Write labelled abstract images (stripes, circles, grid, noise, gradient) for demos and tests."""
    from genart.data.synth import make_synth

    if num < 1 or size < 8:
        raise UserError("--num must be >= 1 and --size >= 8")
    counts = make_synth(out, num=num, size=size, seed=seed)
    click.echo(f"wrote {sum(counts.values())} images in {len(counts)} genres to {out}: " + ", ".join(f"{g} {n}" for g, n in counts.items()))


# ---------------------------------------------------------------- training


# ---------------------------------------------------------------- batch inference


# ---------------------------------------------------------------- serving


# ---------------------------------------------------------------- evaluation


# ---------------------------------------------------------------- operations
