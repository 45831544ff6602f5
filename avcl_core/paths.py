"""Where shipped data and the default cache live."""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def manifests_dir() -> Path:
    """Shipped manifests and protocol files (``AVCL_MANIFESTS`` overrides)."""
    return Path(os.environ.get("AVCL_MANIFESTS", REPO_ROOT / "manifests"))


def default_cache_root() -> str:
    """Default cache root: ``AVCL_CACHE`` or the repository's ``cache/`` folder."""
    return os.environ.get("AVCL_CACHE", str(REPO_ROOT / "cache"))
