"""The `genart` command: parses flags, then calls one function per subcommand. No logic lives here."""

from __future__ import annotations

import functools
import sys

import click

from genart import __version__
from genart.errors import UserError


class _Group(click.Group):
    """One-line errors and stop exits for every subcommand (runtime.command_exits)."""

    def invoke(self, ctx: click.Context):
        from genart import runtime

        with runtime.command_exits("genart"):
            return super().invoke(ctx)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="genart")
def main() -> None:
    """Train, batch-run and serve generative-art models on Ray.

    Without --address (or RAY_ADDRESS) every command that runs on Ray starts an embedded local Ray sized for this
    machine (submit and jobs talk to a cluster's Jobs API instead).
    """


address_option = click.option(
    "--address", envvar="RAY_ADDRESS", default=None, help="Ray cluster address (default: start an embedded local Ray)."
)

stall_option = click.option(
    "--stall-timeout", type=float, default=None, metavar="SECONDS",
    help="Stop with an error when no output comes for this long after the first, e.g. after Ray lost a node and could "
         "not recover the work in flight; what is written is kept (default: 1800 on a cluster, never on the embedded "
         "Ray; 0: wait forever).")

# Ray's write tasks run on any node: a local --output folder must be one every node shares
ON_A_CLUSTER = "On a cluster: s3:// or a folder every node shares."

max_pixels_option = click.option("--max-pixels", type=click.IntRange(min=1), default=None,
                                 help="Reject images with more pixels (default: Pillow's 89.5 MP).")


def set_option(example: str):
    """The repeatable `--set KEY=VALUE` option, with an example key of the command's own config."""
    return click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                        help=f"Override a config key, e.g. --set {example}.")


# ---------------------------------------------------------------- data


@main.command()
@click.argument("srcs", nargs=-1, required=True, metavar="SRC...")
@click.option("--out", "--output", "dest", required=True, help="Destination folder or s3:// prefix for the Parquet dataset. " + ON_A_CLUSTER)
@click.option("--size", type=int, default=None, help="Resize to SIZE x SIZE px (default: keep the normalised original size).")
@click.option("--resize", "resize_mode", type=click.Choice(["crop", "pad"]), default="crop", show_default=True,
              help="How --size makes images square: center-crop, or pad with white.")
@click.option("--labels", type=click.Choice(["dirs", "none"]), default=None,
              help="Label by first-level folder (default when SRC has subfolders) or not at all.")
@click.option("--val-fraction", type=float, default=0.05, show_default=True, help="Share of images in the val split.")
@click.option("--shard-rows", type=int, default=10_000, show_default=True, help="Rows per Parquet shard.")
@max_pixels_option
@click.option("--near-dedup", is_flag=True,
              help="Drop near duplicates (re-encoded, resized, slightly cropped copies); default: only report them.")
@click.option("--near-threshold", type=int, default=None,
              help="Largest perceptual-hash distance (bits) that makes two pictures near duplicates (default: 32).")
@click.option("--overwrite", is_flag=True, help="Replace a dataset already at --out.")
@address_option
def prepare(srcs, dest, size, resize_mode, labels, val_fraction, shard_rows, max_pixels, near_dedup, near_threshold,
            overwrite, address):
    """Turn raw images (folders, .zip/.tar archives, Parquet, MNIST-style idx pairs, s3:// prefixes) into a
    validated, deduplicated, sharded Parquet dataset with manifest.json and rejected.jsonl. Near duplicates (pairs
    within --near-threshold) are listed in near_duplicates.jsonl, and dropped with --near-dedup (the copy with the
    larger source name goes).

    An idx pair is a *-images-idx3-ubyte[.gz] file with its *-labels-idx1-ubyte[.gz] beside it (give the file or
    its folder); its images are labelled by the labels file ("0".."9" for MNIST)."""
    from genart import runtime
    from genart.data import images
    from genart.data import near_dupes
    from genart.data.prepare import PrepareOptions, prepare as run_prepare, summary

    opts = PrepareOptions(size=size, resize_mode=resize_mode, labels=labels, val_fraction=val_fraction,
                          shard_rows=shard_rows, max_pixels=max_pixels or images.DEFAULT_MAX_PIXELS, overwrite=overwrite,
                          near_dedup=near_dedup,
                          near_threshold=near_dupes.DEFAULT_THRESHOLD if near_threshold is None else near_threshold)
    runtime.init(address)  # after the options: a bad flag fails before Ray starts
    manifest = run_prepare(list(srcs), dest, opts)
    click.echo(summary(manifest))
    click.echo(f"dataset: {dest}")


@main.group()
def datasets() -> None:
    """Sample datasets that need no network."""


@datasets.command("synth")
@click.option("--out", "--output", "out", required=True, help="Folder to write <genre>/<genre>-NNNNN.png into.")
@click.option("--num", type=click.IntRange(min=1), default=500, show_default=True, help="Number of images, spread over the genres.")
@click.option("--size", type=click.IntRange(min=8), default=64, show_default=True, help="Image side in px.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
def datasets_synth(out, num, size, seed):
    """Write labelled abstract images (stripes, circles, grid, noise, gradient) for demos and tests."""
    import os

    from genart import storage
    from genart.data.synth import make_synth

    if not storage.is_s3(out) and os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--out {out}: a file, not a folder")
    counts = {genre: n for genre, n in make_synth(out, num=num, size=size, seed=seed).items() if n}
    click.echo(f"wrote {sum(counts.values())} images in {len(counts)} genres to {out}: " + ", ".join(f"{g} {n}" for g, n in counts.items()))


@main.command()
@click.option("--data", required=True, help="Prepared dataset (`genart prepare`), local folder or s3:// prefix.")
@click.option("--colors", type=int, default=16, show_default=True, help="Palette size K (2-512).")
@click.option("--out", "--output", "out", default=None, help="Palette file to write (default: DATASET/palette-K.json, where training looks).")
@click.option("--sample-pixels", type=int, default=200_000, show_default=True, help="Pixels sampled from the train split.")
@click.option("--seed", type=int, default=0, show_default=True, help="Pixel sample and k-means seed.")
@address_option
def palette(data, colors, out, sample_pixels, seed, address):
    """Fit a K-colour palette (k-means on a sample of the dataset's pixels, a Ray Data job) for the
    autoregressive family, which turns images into grids of palette tokens."""
    from genart import runtime
    from genart.data.palette import fit_palette

    runtime.init(address)
    summary = fit_palette(data, colors, out=out, sample_pixels=sample_pixels, seed=seed)
    click.echo(f"palette: {summary['palette']} ({colors} colours from {summary['pixels_sampled']} pixels, "
               f"RMS error {summary['rmse_255']} of 255)")


# ---------------------------------------------------------------- training


@main.command()
@click.argument("config_path", metavar="CONFIG.yaml", type=click.Path(dir_okay=False))
@set_option("train.max_steps=100")
@click.option("--dry-run", is_flag=True, help="One worker, two steps, the smallest model of the family: check the setup.")
@click.option("--output", "--out", "output", default=None, help="With --dry-run: parent folder of the dry run (default: a temporary folder).")
@address_option
def train(config_path, overrides, dry_run, output, address):
    """Train a model (dcgan, vae, vqvae, autoregressive, critic, style) with Ray Train: data-parallel workers,
    checkpoints, samples, metrics.jsonl and loss.png in <run.storage>/<run.name>.

    Re-running the same command resumes from the latest checkpoint. Example:

    \b
        genart train workflows/configs/dcgan.yaml --set data.path=data/synth --set train.max_steps=500
    """
    from genart.train import dry_run as dry
    from genart.train.config import load_config
    from genart.train.trainer import format_summary, train as run_train

    cfg = load_config(config_path, overrides)
    if output is not None and not dry_run:
        raise UserError("--output goes with --dry-run; a real run's folder is run.storage (--set run.storage=...)")
    if dry_run:
        cfg = dry.dry_run_config(cfg, output)
        if output is not None:
            dry.clear_earlier(cfg)
        click.echo(dry.describe(cfg))
    summary = run_train(cfg, address=address, echo=click.echo)
    click.echo(format_summary(summary))
    if dry_run:
        click.echo(f"dry run: {summary['step'] - summary['start_step']} steps ran ({summary['family']})")


# ---------------------------------------------------------------- batch inference


def _run_options(default_batch: int):
    """Flags shared by stylize / generate / score: how the job runs on Ray, and what to do with an existing --output.
    The command gets them as one `run` (infer.RunOptions) and Ray already started (or joined at --address)."""

    def decorate(command):
        @functools.wraps(command)
        def with_run(batch_size, concurrency, gpus_per_worker, cpus_per_worker, deterministic, autocast, resume,
                     overwrite, stall_timeout, address, **kwargs):
            from genart import runtime
            from genart.infer import RunOptions
            from genart.infer.jobs import parse_concurrency

            run = RunOptions(batch_size=default_batch if batch_size is None else batch_size,
                             concurrency=parse_concurrency(concurrency), gpus_per_worker=gpus_per_worker,
                             cpus_per_worker=cpus_per_worker, deterministic=deterministic, autocast=autocast,
                             resume=resume, overwrite=overwrite, stall_timeout_s=stall_timeout)
            runtime.init(address)
            return command(run=run, **kwargs)

        for option in reversed([
            click.option("--batch-size", type=int, default=None, help=f"Rows per model call (default: {default_batch})."),
            click.option("--concurrency", default="1", show_default=True,
                         help="Model actors (each loads the model once): N, or MIN-MAX for a pool that autoscales."),
            click.option("--gpus-per-worker", type=float, default=0.0, show_default=True, help="GPUs per model actor."),
            click.option("--cpus-per-worker", type=float, default=1.0, show_default=True,
                         help="CPUs (torch threads) per model actor."),
            click.option("--deterministic", is_flag=True,
                         help="Outputs that never depend on batching (batch-invariant kernels, no cuDNN autotuning; slower)."),
            click.option("--autocast/--no-autocast", default=None,
                         help="bf16/fp16 autocast (default: on with GPUs, off on CPUs)."),
            click.option("--resume", is_flag=True, help="Finish an interrupted run at --output: only missing outputs are made."),
            click.option("--overwrite", is_flag=True, help="Replace the output of an earlier run at --output."),
            stall_option,
            address_option,
        ]):
            with_run = option(with_run)
        return with_run

    return decorate


@main.command()
@click.option("--model", required=True, help="Style checkpoint: a run folder or a step-* folder, local or s3://.")
@click.option("--input", "src", required=True, help="Folder, .zip/.tar archive, Parquet dataset or s3:// prefix of images.")
@click.option("--output", "--out", "out", required=True, help="Folder or s3:// prefix; outputs keep their input's relative path. " + ON_A_CLUSTER)
@click.option("--max-side", type=int, default=None, help="Downscale so the longer side is at most N px (default: keep size).")
@click.option("--tile", type=int, default=1024, show_default=True, help="Stylise images larger than N px in N x N tiles (0: never).")
@click.option("--tile-overlap", type=int, default=None, help="Tile overlap in px (default: N/8, at least twice the net's reach).")
@click.option("--format", "fmt", type=click.Choice(["png", "jpeg", "webp", "parquet"]), default="png", show_default=True)
@max_pixels_option
@_run_options(default_batch=8)
def stylize(model, src, out, max_side, tile, tile_overlap, fmt, max_pixels, run):
    """Stylise every image under --input with a style model; bad inputs go to errors.jsonl, never stop the job."""
    from genart.data import images
    from genart.infer import jobs, output

    manifest = jobs.stylize(model, src, out, fmt=fmt, max_side=max_side, tile=tile, tile_overlap=tile_overlap,
                            max_pixels=max_pixels or images.DEFAULT_MAX_PIXELS, run=run)
    click.echo(output.summary(manifest))


@main.command()
@click.option("--model", required=True, help="Generative (dcgan, vae, vqvae, autoregressive) checkpoint: a run folder or a step-* folder, local or s3://.")
@click.option("--num", type=int, required=True, help="Number of images.")
@click.option("--output", "--out", "out", required=True, help="Folder or s3:// prefix for seed<S>-<index>.png and images.jsonl. " + ON_A_CLUSTER)
@click.option("--seed", type=int, default=0, show_default=True, help="Image i uses latent seed (SEED << 32) | i.")
@click.option("--truncation", type=float, default=1.0, show_default=True, help="Scale latents toward the mean (1.0 = off).")
@click.option("--label", default=None, help="Class name or index for a class-conditional model (default: the class follows each image's seed).")
@click.option("--guidance", type=float, default=None,
              help="Classifier-free guidance of an autoregressive or vqvae model trained with model.label_dropout "
                   "(1 = off; default: the model's config).")
@click.option("--format", "fmt", type=click.Choice(["png", "parquet"]), default="png", show_default=True)
@_run_options(default_batch=64)
def generate(model, num, out, seed, truncation, label, guidance, fmt, run):
    """Generate --num images, deterministic by --seed whatever the batch size or number of actors."""
    from genart.infer import jobs, output

    manifest = jobs.generate(model, num, out, seed=seed, truncation=truncation, label=label, fmt=fmt, run=run,
                             guidance=guidance)
    click.echo(output.summary(manifest))


@main.command()
@click.option("--model", required=True, help="Critic checkpoint: a run folder or a step-* folder, local or s3://.")
@click.option("--input", "src", required=True, help="Folder, .zip/.tar archive, Parquet dataset or s3:// prefix of images.")
@click.option("--output", "--out", "out", required=True, help="Folder or s3:// prefix for part-*.parquet shards. " + ON_A_CLUSTER)
@max_pixels_option
@_run_options(default_batch=64)
def score(model, src, out, max_pixels, run):
    """Per image: predicted label, class probabilities and embedding from a critic, as Parquet shards + manifest."""
    from genart.data import images
    from genart.infer import jobs, output

    manifest = jobs.score(model, src, out, max_pixels=max_pixels or images.DEFAULT_MAX_PIXELS, run=run)
    click.echo(output.summary(manifest))


# ---------------------------------------------------------------- search


@main.command("index")
@click.option("--input", "src", required=True, help="Prepared dataset, folder, .zip/.tar archive, Parquet or s3:// prefix of images.")
@click.option("--output", "--out", "out", required=True, help="Index folder or s3:// prefix (vectors, faiss.index, metadata.parquet). " + ON_A_CLUSTER)
@click.option("--features", default="inception", show_default=True, metavar="inception|critic:CKPT",
              help="Feature network: InceptionV3 pool features, or a trained critic's embedding.")
@click.option("--inception-weights", default=None, metavar="PATH",
              help="torchvision inception_v3 state_dict (.pth or .safetensors); default: torchvision's download cache.")
@click.option("--nn", "nn_kind", type=click.Choice(["auto", "flat", "hnsw"]), default="auto", show_default=True,
              help="faiss index: exact (flat), HNSW, or auto (exact up to 50,000 vectors).")
@max_pixels_option
@click.option("--batch-size", type=int, default=32, show_default=True, help="Images per model call.")
@click.option("--concurrency", type=int, default=1, show_default=True, help="Embedding actors (each loads the model once).")
@click.option("--gpus-per-worker", type=float, default=0.0, show_default=True, help="GPUs per embedding actor.")
@click.option("--cpus-per-worker", type=float, default=1.0, show_default=True, help="CPUs (torch threads) per embedding actor.")
@click.option("--overwrite", is_flag=True, help="Rebuild from scratch (default: embed only images the index lacks).")
@stall_option
@address_option
def index_cmd(src, out, features, inception_weights, nn_kind, max_pixels, batch_size, concurrency, gpus_per_worker,
              cpus_per_worker, overwrite, stall_timeout, address):
    """Embed every image under --input into a nearest-neighbour index; a rerun embeds only new images.

    Bad inputs go to errors.jsonl beside the index and never stop the job."""
    from genart import runtime
    from genart.data import images
    from genart.infer import RunOptions
    from genart.search import index as search_index

    run = RunOptions(batch_size=batch_size, concurrency=concurrency, gpus_per_worker=gpus_per_worker,
                     cpus_per_worker=cpus_per_worker, overwrite=overwrite, stall_timeout_s=stall_timeout)
    runtime.init(address)
    manifest = search_index.build_index(src, out, features=features, inception_weights=inception_weights, nn=nn_kind,
                                        max_pixels=max_pixels or images.DEFAULT_MAX_PIXELS, run=run)
    click.echo(search_index.summary(manifest))


def _search_out(idx, hits: list, sheet_path: str, query: list, title: str, extra: dict) -> None:
    import json

    from genart import storage
    from genart.search.query import contact_sheet

    storage.write_bytes(sheet_path, contact_sheet(idx, query, hits, title))
    click.echo(json.dumps({**extra, "index": idx.uri, "results": hits, "contact_sheet": sheet_path}, indent=2))


@main.command()
@click.option("--index", "index_uri", required=True, help="Index folder from `genart index` (local or s3://).")
@click.option("--image", "image_path", required=True, help="Query image file (local or s3://).")
@click.option("-k", "k", type=int, default=12, show_default=True, help="Number of results.")
@click.option("--sheet", default="similar.png", show_default=True, help="Where to write the contact-sheet PNG.")
def similar(index_uri, image_path, k, sheet):
    """The -k indexed images closest to --image (cosine similarity of the index's features), as JSON."""
    from genart import storage
    from genart.data.images import Reject
    from genart.search.query import SearchIndex

    idx = SearchIndex.open(index_uri)
    if not storage.exists(image_path):
        raise UserError(f"--image {image_path}: not found")
    data = storage.read_bytes(image_path)
    try:
        hits = idx.similar(data, k)
    except Reject as rej:
        raise UserError(f"--image {image_path}: {rej.reason}") from None
    _search_out(idx, hits, sheet, [data], f"similar to {image_path}", {"query": image_path})


@main.command()
@click.option("--index", "index_uri", required=True, help="Index folder from `genart index` (local or s3://).")
@click.option("--liked", required=True, metavar="ID,ID,...", help="Comma-separated ids (from metadata.parquet or `similar`).")
@click.option("-k", "k", type=int, default=12, show_default=True, help="Number of recommendations.")
@click.option("--diversity", type=float, default=0.3, show_default=True,
              help="Maximal marginal relevance weight: 0 = closest only, 1 = as varied as possible.")
@click.option("--sheet", default="recommend.png", show_default=True, help="Where to write the contact-sheet PNG.")
def recommend(index_uri, liked, k, diversity, sheet):
    """Images like the --liked ones (never those), re-ranked for variety by maximal marginal relevance, as JSON."""
    from genart.search.query import SearchIndex

    ids = [i.strip() for i in liked.split(",") if i.strip()]
    idx = SearchIndex.open(index_uri)
    hits = idx.recommend(ids, k, diversity)
    _search_out(idx, hits, sheet, ids, "liked | recommended", {"liked": ids, "diversity": diversity})


@main.command()
@click.option("--model", required=True, help="Generative (dcgan, vae, vqvae, autoregressive) run folder (best checkpoint) or checkpoint folder, local or s3://.")
@click.option("--data", required=True, help="The prepared dataset it was trained on (`genart prepare`, with a val split).")
@click.option("--num", type=int, default=256, show_default=True, help="Samples to draw (seeds 0..NUM-1).")
@click.option("--features", default="inception", show_default=True, metavar="inception|critic:CKPT",
              help="Embedding space: InceptionV3 pool features, or a trained critic's embedding.")
@click.option("--inception-weights", default=None, metavar="PATH", help="torchvision inception_v3 state_dict file.")
@click.option("--quantile", type=float, default=0.99, show_default=True,
              help="A sample is a copy when closer to a training image than this share of val images are.")
@click.option("--output", "--out", "out", default="audit", show_default=True, help="Folder for summary.json, histogram.png, pairs.png.")
def audit(model, data, num, features, inception_weights, quantile, out):
    """Memorisation audit: each sample's nearest training image in embedding and pixel space, against the
    train-to-val baseline of the dataset itself (Somepalli et al. 2023). Prints the JSON summary."""
    import json

    from genart.search import audit as memorisation

    report = memorisation.audit(model, data, num=num, features=features, inception_weights=inception_weights,
                                quantile=quantile, out=out)
    click.echo(json.dumps(report, indent=2))
    click.echo(memorisation.summary(report))


# ---------------------------------------------------------------- serving


@main.command()
@click.option("--model", "models", multiple=True, metavar="NAME=CKPT",
              help="Serve the checkpoint (run folder or step-* folder, local or s3://) as NAME; its family is read "
                   "from the checkpoint. Repeatable.")
@click.option("--config", "config_file", default=None, type=click.Path(dir_okay=False),
              help="YAML with the app args (the schema of cluster/serve.yaml's args), or a whole Serve config file.")
@click.option("--index", "index_uri", default=None, metavar="IDX",
              help="A `genart index` folder (local or s3://) to serve /v1/similar and /v1/recommend from.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address the HTTP proxy listens on (0.0.0.0: every interface).")
@click.option("--port", type=int, default=8000, show_default=True, help="HTTP port.")
@set_option("max_upload_mb=50")
@address_option
def serve(models, config_file, index_uri, host, port, overrides, address):
    """Serve models over HTTP (API + playground page at /) until Ctrl-C.

    Example: genart serve --model dcgan=results/runs/dcgan --model starry=results/runs/style. An API key is required when
    GENART_API_KEY (or the variable named by api_key_env) is set.
    """
    from genart.serve.run import serve_forever, settings_from

    serve_forever(settings_from(config_file, models, overrides, index_uri), host=host, port=port, address=address)


# ---------------------------------------------------------------- evaluation


@main.command()
@click.option("--model", required=True, help="Generative (dcgan, vae, vqvae, autoregressive) run folder (best checkpoint) or checkpoint folder, local or s3://.")
@click.option("--data", required=True, help="Prepared dataset (`genart prepare`) to compare with, local or s3://.")
@click.option("--num", type=int, default=1000, show_default=True, help="Images to generate (seeds 0..NUM-1).")
@click.option("--features", default="inception", show_default=True, metavar="inception|critic:CKPT",
              help="Feature network: InceptionV3 pool features, or a trained critic's embedding.")
@click.option("--inception-weights", default=None, metavar="PATH",
              help="torchvision inception_v3 state_dict (.pth or .safetensors); default: torchvision's download cache.")
@click.option("--split", type=click.Choice(["all", "train", "val"]), default="all", show_default=True,
              help="Dataset split the real images come from.")
@click.option("--max-real", type=int, default=None, help="Use at most this many real images (a fixed random subset).")
@click.option("--k", "k", type=int, default=3, show_default=True, help="Neighbourhood size of precision/recall's k-NN manifolds.")
@click.option("--output", "--out", "output", default=None, metavar="FILE", help="Also write the JSON report here (local or s3://).")
@click.option("--concurrency", type=int, default=None,
              help="Most feature actors per pool (default: one per GPU, else half the CPUs, at most 8).")
@address_option
def evaluate(model, data, num, features, inception_weights, split, max_real, k, output, concurrency, address):
    """FID, KID and precision/recall of a generative checkpoint against a prepared dataset.

    Real (cached beside the dataset) and generated images are featurised by Ray Data actor pools. Scores on
    critic features are named as such (e.g. fid1k_critic: 1,000 generated, critic features), never plain FID.
    """
    import json

    from genart import runtime
    from genart.evaluate import job

    runtime.init(address)
    report = job.run(model, data, num=num, features=features, split=split, inception_weights=inception_weights,
                     k=k, max_real=max_real, max_actors=concurrency, output=output)
    click.echo(json.dumps(report, indent=2))
    click.echo(job.summary(report))


# ---------------------------------------------------------------- operations


jobs_address_option = click.option(
    "--address", default=None, metavar="URL",
    help="Jobs API of the cluster (default: RAY_API_SERVER_ADDRESS, RAY_ADDRESS, else http://127.0.0.1:8265).",
)


# The command's own flags pass through untouched after its first word (no interspersed options); a misspelt
# submit option before it is an error, not the start of the job's command.
@main.command(context_settings={"allow_interspersed_args": False})
@jobs_address_option
@click.option("--working-dir", default=".", show_default=True, type=click.Path(file_okay=False),
              help="Folder uploaded as the job's working dir (.venv, .git, results, runs left out).")
@click.option("--pip", "pip_packages", multiple=True, metavar="PKG", help="pip requirement to install for the job; repeatable.")
@click.option("--gpus", type=click.FloatRange(min=0), default=None, help="GPUs reserved for the job's entrypoint process.")
@click.option("--no-wait", is_flag=True, help="Print the job id and return instead of streaming the logs.")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def submit(address, working_dir, pip_packages, gpus, no_wait, command):
    """Run COMMAND (any genart command or workflow) on a Ray cluster as a Ray job.

    Streams the job's logs and exits 0 if it succeeded, 1 if it failed or was stopped. The auth token comes
    from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token. COMMAND given as one quoted argument is
    run as a shell line. Example:

    \b
        genart submit --address http://127.0.0.1:8265 -- genart train workflows/configs/dcgan.yaml
    """
    from genart import ray_jobs

    if command[0].startswith("-"):
        raise click.UsageError(f"COMMAND starts with {command[0]!r}: put submit's own options before COMMAND, "
                               f"e.g. genart submit --no-wait -- genart train CONFIG")
    sys.exit(ray_jobs.submit(command, address=address, working_dir=working_dir, pip=pip_packages, gpus=gpus,
                             wait=not no_wait))


@main.group("jobs")
def jobs_group() -> None:
    """List, inspect, follow and stop Ray jobs on a cluster."""


@jobs_group.command("list")
@jobs_address_option
def jobs_list(address):
    """Every job the cluster knows, oldest first."""
    from genart import ray_jobs

    ray_jobs.list_jobs(address)


@jobs_group.command("status")
@click.argument("job_id")
@jobs_address_option
def jobs_status(job_id, address):
    """The job's status and Ray's message about it."""
    from genart import ray_jobs

    ray_jobs.status(job_id, address)


@jobs_group.command("logs")
@click.argument("job_id")
@click.option("--follow", is_flag=True, help="Keep streaming until the job ends; exit 0 if it succeeded, else 1.")
@jobs_address_option
def jobs_logs(job_id, follow, address):
    """The job's logs so far (or, with --follow, until it ends)."""
    from genart import ray_jobs

    sys.exit(ray_jobs.logs(job_id, address, follow_logs=follow))


@jobs_group.command("stop")
@click.argument("job_id")
@jobs_address_option
def jobs_stop(job_id, address):
    """Ask Ray to stop the job."""
    from genart import ray_jobs

    ray_jobs.stop(job_id, address)


if __name__ == "__main__":  # python -m genart.cli, as well as the `genart` script
    main()
