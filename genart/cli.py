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


jobs_address_option = click.option(
    "--address", default=None, metavar="URL",
    help="Jobs API of the cluster (default: RAY_API_SERVER_ADDRESS, RAY_ADDRESS, else http://127.0.0.1:8265).",
)


@main.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@jobs_address_option
@click.option("--working-dir", default=".", show_default=True, type=click.Path(file_okay=False),
              help="Folder uploaded as the job's working dir (.venv, .git, results, runs left out).")
@click.option("--pip", "pip_packages", multiple=True, metavar="PKG", help="pip requirement to install for the job; repeatable.")
@click.option("--gpus", type=float, default=None, help="GPUs reserved for the job's entrypoint process.")
@click.option("--no-wait", is_flag=True, help="Print the job id and return instead of streaming the logs.")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def submit(address, working_dir, pip_packages, gpus, no_wait, command):
    """Run COMMAND (any genart command or workflow) on a Ray cluster as a Ray job.

    Streams the job's logs and exits 0 if it succeeded, 1 if it failed or was stopped. The auth token comes
    from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token. Example:

        genart submit --address http://127.0.0.1:8265 -- genart train workflows/configs/dcgan.yaml
    """
    from genart import jobs as ray_jobs

    sys.exit(ray_jobs.submit(command, address=address, working_dir=working_dir, pip=pip_packages, gpus=gpus,
                             wait=not no_wait))


@main.group("jobs")
def jobs_group() -> None:
    """List, inspect, follow and stop Ray jobs on a cluster."""


@jobs_group.command("list")
@jobs_address_option
def jobs_list(address):
    """Every job the cluster knows, oldest first."""
    from genart import jobs as ray_jobs

    ray_jobs.list_jobs(address)


@jobs_group.command("status")
@click.argument("job_id")
@jobs_address_option
def jobs_status(job_id, address):
    """The job's status and Ray's message about it."""
    from genart import jobs as ray_jobs

    ray_jobs.status(job_id, address)


@jobs_group.command("logs")
@click.argument("job_id")
@click.option("--follow", is_flag=True, help="Keep streaming until the job ends; exit 0 if it succeeded, else 1.")
@jobs_address_option
def jobs_logs(job_id, follow, address):
    """The job's logs so far (or, with --follow, until it ends)."""
    from genart import jobs as ray_jobs

    sys.exit(ray_jobs.logs(job_id, address, follow_logs=follow))


@jobs_group.command("stop")
@click.argument("job_id")
@jobs_address_option
def jobs_stop(job_id, address):
    """Ask Ray to stop the job."""
    from genart import jobs as ray_jobs

    ray_jobs.stop(job_id, address)
