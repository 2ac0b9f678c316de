"""Where the package finds what it does not ship in its own folders.

* A source checkout (``make venv`` installs this package editable) keeps the model
  repository and the bundled recordings in the folder above the package: ``ROOT``.  In a
  non-editable install ``ROOT`` is site-packages and holds neither.
* The artifact cache (``streamasr-artifacts`` builds a complete model repository there:
  the acoustic model, Whisper, the LM) is what a wheel install serves from.
"""

from __future__ import annotations

import os
from pathlib import Path

#: The checkout's root (the folder holding streamasr/).
ROOT = Path(__file__).resolve().parent.parent

#: Overrides the artifact cache's folder.
ENV_CACHE = "STREAMASR_CACHE"


def artifact_cache() -> Path:
    """``$STREAMASR_CACHE``, else ``$XDG_CACHE_HOME/streamasr`` (``~/.cache/streamasr``)."""
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "streamasr"


def checkout_repository() -> Path | None:
    """The checkout's model_repository/ when this package runs from a checkout."""
    repo = ROOT / "model_repository"
    return repo if (repo / "streaming_asr" / "config.pbtxt").is_file() else None


def package_version() -> str:
    """This distribution's version (the cache keeps one repository per version)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("streamasr")
    except PackageNotFoundError:  # imported from a checkout that was never installed
        return "0+checkout"


def cached_repository(cache: Path | None = None) -> Path:
    """The model repository ``streamasr-artifacts`` builds for this version."""
    return (cache or artifact_cache()) / package_version() / "model_repository"
