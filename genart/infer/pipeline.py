"""What every streaming batch job (stylize, score, generate, index) shares around its Ray Data chain: the data
context it is built in (small blocks, no Ray progress bars) and the loop that drains its status rows."""

from __future__ import annotations

import contextlib

from genart.infer import output

# Ray Data coalesces a task's output into blocks of up to 128 MiB by default: a whole read unit (64 images) or
# actor call would then move downstream at once, and decoding, the model and writing would take turns instead of
# overlapping. Small blocks keep a few images in flight between the stages (and the memory bound tight).
BLOCK_BYTES = 1 << 20


@contextlib.contextmanager
def pipeline_context():
    """Start/connect Ray; datasets built inside the block get small blocks (each Dataset copies the context)."""
    import ray

    from genart import runtime

    runtime.init()
    ctx = ray.data.DataContext.get_current()
    saved = ctx.target_max_block_size, ctx.enable_progress_bars
    # genart's own line (output.Progress) counts images end to end; Ray's per-operator bars would fight it
    ctx.target_max_block_size, ctx.enable_progress_bars = BLOCK_BYTES, False
    try:
        yield
    finally:
        ctx.target_max_block_size, ctx.enable_progress_bars = saved


def drain(ds, tally: output.Tally, progress: output.Progress) -> None:
    """Run the pipeline to its end: the driver receives only the small status rows, counts them, shows progress."""
    try:
        for status in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            tally.add(status)
            progress.update(tally, status.num_rows)
    finally:
        progress.close()
