"""Where shipped data and the default cache live."""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def manifests_dir() -> Path:
    """Shipped manifests and protocol files (``AVCL_MANIFESTS`` overrides).

    The repository's ``manifests/`` in a checkout; the installed data package
    ``avcl_manifests`` (the same files) when installed from a wheel.
    """
    if "AVCL_MANIFESTS" in os.environ:
        return Path(os.environ["AVCL_MANIFESTS"])
    local = REPO_ROOT / "manifests"
    if (local / "protocols").is_dir():
        return local
    from importlib.util import find_spec

    spec = find_spec("avcl_manifests")  # a namespace package: its folder is its search location
    return Path(list(spec.submodule_search_locations)[0]) if spec else local


def default_cache_root() -> str:
    """Default cache root: ``AVCL_CACHE``, else the checkout's ``cache/`` folder, else
    ``~/.cache/avcl`` (an install from a wheel has no checkout)."""
    if "AVCL_CACHE" in os.environ:
        return os.environ["AVCL_CACHE"]
    if (REPO_ROOT / "cache" / "README.md").is_file():
        return str(REPO_ROOT / "cache")
    return str(Path.home() / ".cache" / "avcl")
