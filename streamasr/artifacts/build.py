"""``streamasr-artifacts``: build a complete model repository into the artifact cache.

    streamasr-artifacts                 # -> ~/.cache/streamasr/<version>/model_repository
    streamasr-artifacts --cache DIR     # or $STREAMASR_CACHE
    streamasr-artifacts --force         # rebuild what is already there

What it writes: every ``config.pbtxt`` from the typed spec (``streamasr.triton.spec``), the
streaming acoustic model (the packaged Whisper tiny.en encoder + the bundled CTC head, one
ONNX graph, checked against its contract and against torch), the Whisper re-decoder for
two-pass finals (and its int8 copy for interim refreshes), and the word LM.  About 2-4 minutes on 2 cores; each artifact is written
to a temporary name and renamed when complete, so an interrupted build leaves no half file
and a re-run builds only what is missing.  ``streamasr-server`` serves the result when it
runs outside a checkout.  Needs the ``artifacts`` extra: ``pip install 'streamasr[artifacts]'``.
"""

from __future__ import annotations

import logging
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from streamasr import checkout
from streamasr.cli import argument_parser
from streamasr.core.whisper_redecoder import INT8_GRAPHS, SUPPORT_FILES, graph_files
from streamasr.triton import spec

log = logging.getLogger("streamasr.artifacts")

ACOUSTIC_MODEL = Path("acoustic_model/1/model.onnx")
LM = Path("ctc_decoder/1/en-us.arpa")
WHISPER_DIR = Path("final_pass/1")
# + the int8 copies (quantize_whisper) for finals and interim refreshes
WHISPER_FILES = (*graph_files(), *SUPPORT_FILES, *graph_files(INT8_GRAPHS))


def _build_acoustic(out: Path) -> None:
    from . import acoustic

    acoustic.build_onnx(out)


def _build_lm(out: Path) -> None:
    from . import build_lm

    build_lm.build(out)


def _build_whisper(out_dir: Path) -> None:
    from . import export_whisper, quantize_whisper

    export_whisper.export(out_dir)
    quantize_whisper.quantize(out_dir, out_dir, INT8_GRAPHS)


def write_configs(repo: Path) -> None:
    """Every model's config.pbtxt from the spec, and its version folder."""
    for rel, text in spec.rendered().items():
        path = repo / rel
        (path.parent / "1").mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def _file_step(repo: Path, rel: Path, build: Callable[[Path], None], force: bool) -> bool:
    target = repo / rel
    if target.is_file() and not force:
        return False
    tmp = target.with_name(f".{target.name}.partial{target.suffix}")
    build(tmp)
    tmp.replace(target)
    return True


def _dir_step(repo: Path, rel: Path, files: tuple[str, ...], build, force: bool) -> bool:
    target = repo / rel
    if all((target / f).is_file() for f in files) and not force:
        return False
    with tempfile.TemporaryDirectory(dir=repo) as tmp:
        build(Path(tmp))
        for f in files:
            (Path(tmp) / f).replace(target / f)
    return True


def build_repository(repo: Path, force: bool = False) -> dict[str, float]:
    """Fill ``repo`` with configs and every artifact; returns seconds per built artifact."""
    repo.mkdir(parents=True, exist_ok=True)
    write_configs(repo)
    took: dict[str, float] = {}
    steps = (
        ("acoustic model", lambda: _file_step(repo, ACOUSTIC_MODEL, _build_acoustic, force)),
        ("word LM", lambda: _file_step(repo, LM, _build_lm, force)),
        ("Whisper", lambda: _dir_step(repo, WHISPER_DIR, WHISPER_FILES, _build_whisper, force)),
    )
    for name, step in steps:
        t0 = time.monotonic()
        if step():
            took[name] = time.monotonic() - t0
            log.info("built the %s in %.1f s", name, took[name])
        else:
            log.info("the %s is there already (--force rebuilds it)", name)
    return took


def main(argv: list[str] | None = None) -> int:
    p = argument_parser("streamasr-artifacts", __doc__)
    p.add_argument(
        "--cache",
        type=Path,
        default=None,
        help=f"cache folder (default: ${checkout.ENV_CACHE}, else ~/.cache/streamasr)",
    )
    p.add_argument("--force", action="store_true", help="rebuild artifacts already there")
    p.add_argument("--threads", type=int, default=2, help="torch threads for the exports")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        import torch
    except ImportError:
        log.error("the exports need torch: pip install 'streamasr[artifacts]'")
        return 2
    torch.set_num_threads(a.threads)
    repo = checkout.cached_repository(a.cache)
    build_repository(repo, a.force)
    # The one line a script reads: where the repository is.
    sys.stdout.write(f"{repo}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
