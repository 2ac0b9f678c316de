"""The model repository's configs, in one place: parse and write a ``config.pbtxt`` (as
protobuf, never by text substitution), copy a repository with some values changed, and
the production variant (SageMaker image).

Locally every model runs on the CPU, the acoustic model through our Python stand-in
for Triton's onnxruntime backend.  In the image Triton's NATIVE onnxruntime backend
serves it, and on a GPU instance it should run there: ``production_overlay`` copies the
repository and rewrites a parsed copy of each onnxruntime model's config (protobuf,
no text substitution) with a GPU instance group.  The Python steps stay on the CPU.

    python -m streamasr.triton.repository model_repository /opt/ml/model [--cpu]
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Callable

from streamasr.cli import argument_parser
from streamasr.pipeline.common import parse_config
from streamasr.triton.spec import (
    ACOUSTIC_BATCH_BOUNDED,
    acoustic_model_of,
    check_acoustic_batches,
)

log = logging.getLogger("streamasr.triton.repository")

NATIVE_GPU_BACKENDS = {"onnxruntime"}
#: The models of two-pass finals: they need the built Whisper files and a Whisper-style
#: log-mel acoustic model, so copies for other purposes may leave them out.
TWO_PASS_MODELS = ("final_pass", "streaming_asr_two_pass")


def check_limits(repo: Path) -> list[str]:
    """What in ``repo`` breaks a limit between models (empty: nothing): each of
    ``ACOUSTIC_BATCH_BOUNDED`` at most the ``max_batch_size`` of the acoustic model that
    model names (parameter ``acoustic_model``), the rule the spec (streamasr.triton.spec)
    checks for the committed repository.  Models absent from ``repo`` are skipped."""
    repo = Path(repo)
    configs = {}
    for model, _ in ACOUSTIC_BATCH_BOUNDED:
        path = repo / model / "config.pbtxt"
        if path.exists():
            configs[model] = cfg = parse_config(path)
            acoustic = acoustic_model_of(cfg)
            if (repo / acoustic / "config.pbtxt").exists():
                configs[acoustic] = parse_config(repo / acoustic / "config.pbtxt")
    return check_acoustic_batches(configs)


def write_config(path: Path, cfg: Any, header: str = "") -> None:
    """Write a ModelConfig message back as text (comments are not kept: ``header`` is the
    one written above it)."""
    from google.protobuf import text_format

    Path(path).write_text(header + text_format.MessageToString(cfg))


def edit_config(path: Path, edit: Callable[[Any], None]) -> None:
    """Parse, change in place with ``edit(cfg)``, write back."""
    cfg = parse_config(path)
    edit(cfg)
    write_config(path, cfg)


def override(cfg: Any, parameters: dict[str, str], idle_us: int | None = None) -> None:
    """Set string ``parameters`` and (when given) the sequence batcher's idle time."""
    for k, v in parameters.items():
        cfg.parameters[k].string_value = v
    if idle_us is not None:
        cfg.sequence_batching.max_sequence_idle_microseconds = idle_us


def copy_repository(
    src: Path,
    dst: Path,
    parameters: dict[str, dict[str, str]] | None = None,
    *,
    idle_us: dict[str, int] | None = None,
    leave_out: tuple[str, ...] = (),
    link_suffixes: tuple[str, ...] = (),
) -> Path:
    """Copy the repository ``src`` to ``dst`` with config values changed: ``parameters``
    (model -> key -> string value), ``idle_us`` (model -> sequence batcher idle time);
    models in ``leave_out`` are not copied; files ending in ``link_suffixes`` are
    symlinked instead of copied (large ONNX files)."""
    src, dst = Path(src), Path(dst)

    def copy(s: str, d: str) -> None:
        if link_suffixes and s.endswith(link_suffixes):
            os.symlink(s, d)
        else:
            shutil.copy2(s, d)

    shutil.copytree(
        src,
        dst,
        symlinks=True,
        copy_function=copy,
        ignore=lambda d, names: [n for n in names if n in leave_out] if Path(d) == src else [],
    )
    for model in set(parameters or {}) | set(idle_us or {}):

        def change(cfg: Any, model: str = model) -> None:
            override(cfg, (parameters or {}).get(model, {}), (idle_us or {}).get(model))

        edit_config(dst / model / "config.pbtxt", change)
    return dst


def overlay_config(cfg, gpu: bool = True, gpu_count: int = 1):
    """Rewrite one parsed ModelConfig in place for production; returns whether it changed."""
    from tritonclient.grpc import model_config_pb2

    if cfg.backend not in NATIVE_GPU_BACKENDS:
        return False
    kind = (
        model_config_pb2.ModelInstanceGroup.KIND_GPU
        if gpu
        else model_config_pb2.ModelInstanceGroup.KIND_CPU
    )
    del cfg.instance_group[:]
    cfg.instance_group.add(kind=kind, count=gpu_count)
    return True


def production_overlay(
    src_repo: Path, dst_repo: Path, gpu: bool = True, gpu_count: int = 1
) -> list[str]:
    """Copy ``src_repo`` to ``dst_repo`` (which must not exist or be empty) with the
    production configs; returns the names of the models whose config changed."""
    src_repo, dst_repo = Path(src_repo), Path(dst_repo)
    if dst_repo.exists() and any(dst_repo.iterdir()):
        raise FileExistsError(f"{dst_repo} is not empty")
    shutil.copytree(
        src_repo,
        dst_repo,
        dirs_exist_ok=True,
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
    )
    problems = check_limits(dst_repo)
    if problems:
        raise ValueError(f"{src_repo}: " + "; ".join(problems))
    changed = []
    for cfg_path in sorted(dst_repo.glob("*/config.pbtxt")):
        cfg = parse_config(cfg_path)
        if overlay_config(cfg, gpu=gpu, gpu_count=gpu_count):
            write_config(cfg_path, cfg, "# production overlay (streamasr.triton.repository)\n")
            changed.append(cfg.name or cfg_path.parent.name)
            log.info(
                "%s: instance_group -> %s x%d",
                cfg_path.parent.name,
                "KIND_GPU" if gpu else "KIND_CPU",
                gpu_count,
            )
    return changed


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s")
    p = argument_parser("python -m streamasr.triton.repository", __doc__)
    p.add_argument("src", type=Path)
    p.add_argument("dst", type=Path)
    p.add_argument("--cpu", action="store_true", help="CPU instance groups (CPU instances)")
    p.add_argument("--gpu-count", type=int, default=1, help="instances per GPU")
    a = p.parse_args(argv)
    changed = production_overlay(a.src, a.dst, gpu=not a.cpu, gpu_count=a.gpu_count)
    if not changed:
        log.error(
            "no model uses a native GPU backend (%s); nothing to place on the GPU",
            ", ".join(sorted(NATIVE_GPU_BACKENDS)),
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
