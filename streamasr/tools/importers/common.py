"""What both importers share: the contract from command-line arguments, contract
metadata on an ONNX model, and the acoustic_model config / model repository to serve it."""

from __future__ import annotations

import argparse
import dataclasses
import shutil
from pathlib import Path

import onnx

from streamasr import checkout
from streamasr.protocol.contract import PREFIX, FeatureSpec, ModelContract
from streamasr.triton.repository import TWO_PASS_MODELS, parse_config, write_config

PROJECT_REPOSITORY = checkout.ROOT / "model_repository"
ACOUSTIC = "acoustic_model"


def _not_copied(folder: Path, names: list[str]) -> list[str]:
    """What a new repository does not take from the project's: the bundled model file
    and the two-pass models."""
    if folder == PROJECT_REPOSITORY:
        return [n for n in names if n in TWO_PASS_MODELS]
    if folder.name == "1" and folder.parent.name == ACOUSTIC:
        return ["model.onnx"]
    return []


class ImporterError(ValueError):
    """The model cannot be imported as given; the message says what to change."""


def add_contract_arguments(p: argparse.ArgumentParser, chunk: int, left: int, right: int) -> None:
    g = p.add_argument_group("chunk geometry (feature frames)")
    g.add_argument(
        "--chunk-frames",
        type=int,
        default=chunk,
        help=f"frames each window emits output for (default {chunk})",
    )
    g.add_argument(
        "--left-frames",
        type=int,
        default=left,
        help=f"left-context frames per window (default {left})",
    )
    g.add_argument(
        "--right-frames",
        type=int,
        default=right,
        help=f"look-ahead frames per window (default {right})",
    )
    m = p.add_argument_group("model card (contract metadata)")
    m.add_argument("--name", default=None, help="model name (default: from the source)")
    m.add_argument("--version", default="1")
    m.add_argument("--license", default="unknown")
    m.add_argument("--description", default="")
    o = p.add_argument_group("output")
    o.add_argument("--output", "-o", type=Path, required=True, help="the contract ONNX to write")
    o.add_argument(
        "--repository",
        type=Path,
        default=None,
        help="also write a model repository: a copy of this project's "
        "model_repository/ if the folder does not exist, else the existing "
        "one updated; its acoustic_model/1/model.onnx and config.pbtxt dims "
        "are replaced",
    )


def contract_from_args(
    a: argparse.Namespace,
    features: FeatureSpec,
    subsampling: int,
    vocabulary: list[str],
    blank_id: int,
    word_boundary: str,
    default_name: str,
) -> ModelContract:
    return ModelContract(
        features=features,
        chunk_frames=a.chunk_frames,
        left_frames=a.left_frames,
        right_frames=a.right_frames,
        subsampling=subsampling,
        vocabulary=tuple(vocabulary),
        blank_id=blank_id,
        word_boundary=word_boundary,
        name=a.name or default_name,
        version=a.version,
        license=a.license,
        description=a.description,
    ).validate()


def set_contract_metadata(model: onnx.ModelProto, contract: ModelContract) -> None:
    """Replace any streamasr.* metadata on ``model`` with ``contract``'s."""
    keep = [(p.key, p.value) for p in model.metadata_props if not p.key.startswith(PREFIX)]
    del model.metadata_props[:]
    for k, v in keep + sorted(contract.to_metadata().items()):
        model.metadata_props.add(key=k, value=v)


def acoustic_model_config(contract: ModelContract, template: Path | None = None):
    """acoustic_model's ModelConfig (protobuf) for ``contract``: the template's config
    (batching, backend...) with the input/output names and dims replaced."""
    from tritonclient.grpc import model_config_pb2

    template = template or PROJECT_REPOSITORY / ACOUSTIC / "config.pbtxt"
    cfg = parse_config(template)
    if len(cfg.input) != 1 or len(cfg.output) != 1:
        raise ImporterError(f"{template}: expected one input and one output")
    inp, out = cfg.input[0], cfg.output[0]
    inp.name, out.name = contract.input_name, contract.output_name
    inp.data_type = out.data_type = model_config_pb2.TYPE_FP32
    inp.ClearField("dims")
    inp.dims.extend([contract.window_frames, contract.features.n_mels])
    out.ClearField("dims")
    out.dims.extend([contract.output_frames, len(contract.vocabulary)])
    return cfg


def windows_per_request(contract: ModelContract, max_chunk_seconds: float) -> int:
    """The feature step's worst case for one request (its own check, mirrored here)."""
    max_samples = int(max_chunk_seconds * contract.sample_rate)
    return (
        -(
            -(max_samples // contract.features.hop_length + contract.window_frames)
            // contract.chunk_frames
        )
        + 1
    )


def write_repository(repo: Path, model_path: Path, contract: ModelContract) -> list[str]:
    """Put the model into ``repo`` (created from this project's model_repository/ if
    missing) and make the configs agree with its contract.  Returns what was changed."""

    notes = []
    if not repo.exists():
        if not PROJECT_REPOSITORY.is_dir():
            raise ImporterError(
                f"{repo} does not exist and there is no {PROJECT_REPOSITORY} "
                "to copy it from; pass an existing model repository"
            )
        # Two-pass finals re-decode with Whisper, which needs Whisper's own features:
        # an imported model's repository serves one-pass streaming only.
        shutil.copytree(
            PROJECT_REPOSITORY,
            repo,
            symlinks=True,
            ignore=lambda d, names: _not_copied(Path(d), names),
        )
        notes.append(
            f"created {repo} from {PROJECT_REPOSITORY} "
            f"(without the two-pass models {list(TWO_PASS_MODELS)})"
        )
    am = repo / ACOUSTIC
    if not (am / "config.pbtxt").exists():
        raise ImporterError(f"{repo} has no {ACOUSTIC}/config.pbtxt")
    (am / "1").mkdir(parents=True, exist_ok=True)
    if model_path.resolve() != (am / "1" / "model.onnx").resolve():
        shutil.copyfile(model_path, am / "1" / "model.onnx")
    cfg = acoustic_model_config(contract, am / "config.pbtxt")
    write_config(am / "config.pbtxt", cfg)
    notes.append(
        f"wrote {am / '1' / 'model.onnx'} and {am / 'config.pbtxt'} "
        f"(input dims {list(cfg.input[0].dims)}, output dims {list(cfg.output[0].dims)})"
    )
    # The feature step refuses to load if one request could yield more windows than it
    # may send: lower max_chunk_seconds to what fits.
    fe_path = repo / "feature_extractor" / "config.pbtxt"
    if fe_path.exists():
        fe = parse_config(fe_path)
        max_w = int(fe.parameters["max_windows_per_request"].string_value or cfg.max_batch_size)
        secs = float(fe.parameters["max_chunk_seconds"].string_value or 10)
        if windows_per_request(contract, secs) > max_w:
            fit = secs
            while fit > 0.01 and windows_per_request(contract, fit) > max_w:
                fit = round(fit - 0.01, 2)
            if windows_per_request(contract, fit) > max_w:
                raise ImporterError(
                    f"chunk_frames {contract.chunk_frames} is too small for "
                    f"max_windows_per_request {max_w}"
                )
            fe.parameters["max_chunk_seconds"].string_value = f"{fit:g}"
            write_config(fe_path, fe)
            notes.append(
                f"lowered feature_extractor max_chunk_seconds {secs:g} -> {fit:g} "
                f"(at most {max_w} windows per request)"
            )
    return notes


def finish(model: onnx.ModelProto, contract: ModelContract, a: argparse.Namespace) -> int:
    """Check, save, validate against the contract, print the config dims, write the
    repository if asked."""
    from streamasr.artifacts.idle_window import IDLE_WINDOW_VALUE, add_idle_window, has_idle_window
    from streamasr.protocol.contract import check_onnx_io

    # small client requests (no complete window) then cost the model nothing
    if not has_idle_window(model):
        model = add_idle_window(model, (contract.output_frames, len(contract.vocabulary)))
    contract = dataclasses.replace(contract, idle_window=IDLE_WINDOW_VALUE)
    set_contract_metadata(model, contract)
    onnx.checker.check_model(model)
    a.output.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(a.output))
    problems = check_onnx_io(a.output, ModelContract.from_onnx(a.output))
    if problems:
        raise ImporterError(
            "the written model breaks the contract:\n  - " + "\n  - ".join(problems)
        )
    from google.protobuf import text_format

    print(
        f"wrote {a.output}: {contract.name}, {contract.sample_rate} Hz {contract.features.type}"
        f" features, window {contract.window_frames} frames (left {contract.left_frames}, "
        f"chunk {contract.chunk_frames} = {contract.chunk_seconds * 1000:.0f} ms, right "
        f"{contract.right_frames}), subsampling {contract.subsampling}, vocabulary "
        f"{len(contract.vocabulary)}, blank {contract.blank_id}"
    )
    cfg = acoustic_model_config(contract)
    print("model_repository/acoustic_model/config.pbtxt needs:")
    for t in list(cfg.input) + list(cfg.output):
        print("  " + text_format.MessageToString(t, as_one_line=True))
    if a.repository is not None:
        for note in write_repository(a.repository, a.output, contract):
            print(note)
    return 0
