"""A small static HTML report over a results folder: what a person opens after a workflow.

    from genart.report import write_report
    write_report("results/quickstart", "genart quickstart", intro, sections)   # -> results/quickstart/index.html

Sections are built by the workflow (it knows what it made); this module only lays them out, with
relative links so the folder can be zipped, copied or served as it is.
"""

from __future__ import annotations

import html
import os
import urllib.parse
from dataclasses import dataclass, field

from genart import storage


@dataclass
class Section:
    title: str
    text: str = ""  # one short paragraph of HTML: escape (html.escape) any name or path it quotes
    images: list[tuple[str, str]] = field(default_factory=list)  # (path, caption); paths local to the machine
    table: list[list[str]] = field(default_factory=list)  # first row is the header
    links: list[tuple[str, str]] = field(default_factory=list)  # (path, label)
    # small pixel pictures (sample grids of 32 px images) shown this many times their size, nearest-neighbour, while
    # that stays within ZOOM_MAX_WIDTH; larger images (loss curves) keep the default layout
    zoom: int = 1


ZOOM_MAX_WIDTH = 560  # px: two zoomed grids or a grid and a loss curve side by side in the 1100 px column


STYLE = """
body { font: 15px/1.5 system-ui, sans-serif; margin: 2rem auto; max-width: 1100px; padding: 0 1rem; color: #222; }
h1 { font-size: 1.6rem; } h2 { font-size: 1.2rem; margin-top: 2.2rem; border-bottom: 1px solid #ddd; }
.grid { display: flex; flex-wrap: wrap; gap: 1rem; }
figure { margin: 0; max-width: 340px; }
figure img { max-width: 340px; min-width: 96px; image-rendering: pixelated; border: 1px solid #ddd; }  /* 32 px samples shown at 3x */
figure.zoom img { max-width: none; }
figcaption { font-size: .85rem; color: #555; }
table { border-collapse: collapse; } td, th { padding: .2rem .8rem; border-bottom: 1px solid #eee; text-align: left; }
code { background: #f4f4f4; padding: 0 .3rem; }
"""


def _rel(path: str, root: str) -> str:
    """A relative link to `path`: URL-quoted (a file named `a#1.png` is not a fragment), then HTML-escaped."""
    return html.escape(urllib.parse.quote(os.path.relpath(path, root).replace(os.sep, "/")), quote=True)


def _zoomed_width(path: str, zoom: int) -> int | None:
    """The display width of a `zoom`ed image, or None to leave it to the style sheet (no zoom, too wide, unreadable)."""
    if zoom <= 1:
        return None
    from PIL import Image

    try:
        with Image.open(path) as img:  # reads the header only
            width = img.width * zoom
    except OSError:
        return None
    return width if width <= ZOOM_MAX_WIDTH else None


def render(root: str, title: str, intro: str, sections: list[Section]) -> str:
    """The page. `intro` and each section's text are HTML (the caller escapes what they quote); titles, captions,
    table cells and link labels are text and escaped here."""
    parts = [f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title><style>{STYLE}</style>"]
    parts.append(f"<h1>{html.escape(title)}</h1><p>{intro}</p>")
    for sec in sections:
        parts.append(f"<h2>{html.escape(sec.title)}</h2>")
        if sec.text:
            parts.append(f"<p>{sec.text}</p>")
        if sec.table:
            head, *rows = sec.table
            parts.append("<table><tr>" + "".join(f"<th>{html.escape(str(c))}</th>" for c in head) + "</tr>")
            for row in rows:
                parts.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>")
            parts.append("</table>")
        if sec.images:
            parts.append("<div class='grid'>")
            for path, caption in sec.images:
                src = _rel(path, root)
                width = _zoomed_width(path, sec.zoom)
                # the figure as wide as its picture, so a long caption wraps under it instead of widening it
                figure, size = ((f"<figure class='zoom' style='max-width: {width + 2}px'>", f" width='{width}'") if width
                                else ("<figure>", ""))
                parts.append(f"{figure}<a href='{src}'><img src='{src}'{size} alt='{html.escape(caption, quote=True)}'></a>"
                             f"<figcaption>{html.escape(caption)}</figcaption></figure>")
            parts.append("</div>")
        if sec.links:
            parts.append("<ul>" + "".join(f"<li><a href='{_rel(p, root)}'>{html.escape(label)}</a></li>" for p, label in sec.links) + "</ul>")
    return "\n".join(parts) + "\n"


def write_report(root: str, title: str, intro: str, sections: list[Section]) -> str:
    """Write <root>/index.html and return its path."""
    path = os.path.join(root, "index.html")
    storage.write_text(path, render(root, title, intro, sections))  # atomic, and UTF-8 whatever the locale
    return path


def contact_sheet(uris: list[str], thumb: int = 192, columns: int = 4) -> bytes:
    """PNG bytes of up to `columns` x n thumbnails of the images at `uris` (local or s3://), in order.

    For a glance at a job's outputs where they live (e.g. a preview.png beside stylized images on S3).
    Unreadable files are left blank: the sheet is a preview, the job's errors.jsonl is the record.
    """
    import io

    from PIL import Image

    from genart.data.images import Reject, decode_image

    rows = max(1, -(-len(uris) // columns))
    sheet = Image.new("RGB", (columns * (thumb + 4) + 4, rows * (thumb + 4) + 4), "white")
    for i, uri in enumerate(uris):
        try:
            img = decode_image(storage.read_bytes(uri))
        except (Reject, OSError):
            continue
        img.thumbnail((thumb, thumb))
        x, y = 4 + (i % columns) * (thumb + 4), 4 + (i // columns) * (thumb + 4)
        sheet.paste(img, (x + (thumb - img.width) // 2, y + (thumb - img.height) // 2))
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    return buf.getvalue()
