"""Images shipped with genart (public domain; attribution in SOURCES.md): style images, sample paintings, a photo."""

from pathlib import Path

ASSETS = Path(__file__).parent
STYLES = ASSETS / "styles"
PAINTINGS = ASSETS / "paintings"
PHOTOS = ASSETS / "photos"


def style_image(name: str) -> Path:
    """A shipped style image by file name (e.g. 'starry_night.jpg'), or a user's own path."""
    candidate = STYLES / name
    return candidate if candidate.is_file() else Path(name)
