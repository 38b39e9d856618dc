"""Art search: embedding indexes over image archives (`index`), queries (`similar`, `recommend`), memorisation audit."""

import hashlib


def index_version(manifest_text: str) -> str:
    """An index build's version: the digest of its index.json (written last, so a rebuild gives another)."""
    return hashlib.sha256(manifest_text.encode()).hexdigest()[:16]
