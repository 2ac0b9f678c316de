"""The model repository's configs agree with each other and with the model contract
(no server needed; tests/integration/test_streaming.py checks that Triton loads them)."""

from __future__ import annotations

import pytest

from streamasr.pipeline.common import parse_config, read_config, stream_idle_timeout

from ..helpers import REPOSITORY


@pytest.fixture(scope="module")
def configs():
    return {p.name: read_config(p) for p in REPOSITORY.iterdir() if (p / "config.pbtxt").exists()}


def dims(tensor) -> list[int]:
    return [int(d) for d in tensor["dims"]]


def test_acoustic_model_config_matches_its_contract(configs, contract):
    am = configs["acoustic_model"].raw
    assert am["backend"] == "onnxruntime"
    assert am["max_batch_size"] > 1 and "dynamic_batching" in am
    (inp,) = am["input"]
    (out,) = am["output"]
    assert inp["name"] == contract.input_name
    assert dims(inp) == [contract.window_frames, contract.features.n_mels], (
        "acoustic_model/config.pbtxt input dims disagree with the model's contract"
    )
    assert out["name"] == contract.output_name
    assert dims(out) == [contract.output_frames, len(contract.vocabulary)], (
        "acoustic_model/config.pbtxt output dims disagree with the model's contract"
    )


def test_window_limits_fit_the_acoustic_models_batch(configs):
    mbs = configs["acoustic_model"].raw["max_batch_size"]
    assert int(configs["feature_extractor"].param("max_windows_per_request")) <= mbs
    assert int(configs["offline_asr"].param("max_batch")) <= mbs


def test_check_limits_finds_a_window_count_above_the_acoustic_batch(tmp_path):
    from streamasr.triton.repository import ACOUSTIC_BATCH_BOUNDED, check_limits, copy_repository

    assert check_limits(REPOSITORY) == []
    for model, key in ACOUSTIC_BATCH_BOUNDED:
        dst = copy_repository(
            REPOSITORY, tmp_path / model, {model: {key: "33"}}, link_suffixes=(".onnx",)
        )
        (problem,) = check_limits(dst)
        assert problem.startswith(f"{model} {key} 33 exceeds acoustic_model max_batch_size 32")


def test_final_pass_batch_limits_are_its_max_batch_size(configs):
    """Written once: max_requests_per_batch and max_utterances_per_call default to
    final_pass's max_batch_size, and the committed config sets neither."""
    fp = configs["final_pass"]
    assert fp.raw["max_batch_size"] > 1
    assert not {"max_requests_per_batch", "max_utterances_per_call"} & set(fp.parameters())


def test_offline_asr_decodes_with_the_ensembles_decoder_step(configs):
    """offline_asr names the ctc_decoder whose decoding it copies (one-way: nothing else
    reads a sibling's decoder parameters), and it is the one both ensembles decode with."""
    name = configs["offline_asr"].param("decoder_model")
    assert configs[name].raw["backend"] == "streamasr_ctc_decoder"
    for ensemble in ("streaming_asr", "streaming_asr_two_pass"):
        steps = configs[ensemble].raw["ensemble_scheduling"]["step"]
        assert name in [s["model_name"] for s in steps]
    readers = {m for m, c in configs.items() if "decoder_model" in c.parameters()}
    assert readers == {"offline_asr"}


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"decoding": "greedy"},
        {"decoding": "beam", "beam_size": "64", "hotwords": "triton:2,tensor rt"},
        {"hotword_boost": "3", "hotwords": "cat"},
        {"lm_alpha": "0.3", "lm_beta": "-1", "time_offset": "12.5", "interims": "whisper"},
        {"endpointing": "false", "rule2_min_trailing_silence": "0.5", "utterance_end": "0"},
        {"beam_size": "0"},
        {"decoding": "viterbi"},
        {"hotwords": "cat:1e9"},
        {"lm_alpha": "nan"},
        {"lm_path": "/etc/passwd"},
        {"beam_sise": "4"},
        {"rule1_min_trailing_silence": "soon"},
    ],
)
def test_stream_options_are_judged_alike_with_or_without_the_decoders_config(options):
    """The feature step validates START options against the declared defaults (no
    sibling config read); the ctc_decoder's served parameters change no verdict."""
    from streamasr.pipeline import ctc_decoder

    def verdict(validate):
        try:
            validate(options)
        except ValueError as exc:
            return str(exc).split(":")[0]
        return "ok"

    served = ctc_decoder.served_defaults(REPOSITORY / "ctc_decoder")
    assert served.decoder  # the bundled decoder does override the declared defaults
    assert verdict(ctc_decoder.validate_stream_options) == verdict(served.validate)


def test_ensemble_has_no_sequence_batching_and_the_feature_step_does(configs):
    ens = configs["streaming_asr"].raw
    assert ens["platform"] == "ensemble" and "sequence_batching" not in ens
    steps = [s["model_name"] for s in ens["ensemble_scheduling"]["step"]]
    assert steps == ["feature_extractor", "acoustic_model", "ctc_decoder"]
    fe = configs["feature_extractor"]
    assert "oldest" in fe.raw["sequence_batching"]
    # our TTL sweep must fire before Triton forgets the sequence
    assert stream_idle_timeout(fe) < fe.sequence_idle_s()


def test_decoder_keeps_every_stream_in_one_instance(configs):
    """Streams are routed by STEP_INFO, not by a sequence batcher, so one instance must
    hold them all (see ctc_decoder/config.pbtxt)."""
    dec = configs["ctc_decoder"].raw
    assert "sequence_batching" not in dec
    assert [g.get("count", 1) for g in dec["instance_group"]] == [1]


def test_stateful_steps_agree_on_the_idle_timeout(configs):
    assert stream_idle_timeout(configs["feature_extractor"]) == stream_idle_timeout(
        configs["ctc_decoder"]
    )


def test_copy_repository_edits_configs_as_protobuf(tmp_path):
    from streamasr.triton.repository import TWO_PASS_MODELS, copy_repository, parse_config

    dst = copy_repository(
        REPOSITORY,
        tmp_path / "repo",
        {"ctc_decoder": {"stream_idle_timeout_s": "2.5"}},
        idle_us={"feature_extractor": 7_000_000},
        leave_out=TWO_PASS_MODELS,
        link_suffixes=(".onnx",),
    )
    assert not any((dst / m).exists() for m in TWO_PASS_MODELS)
    assert (dst / "acoustic_model" / "1" / "model.onnx").is_symlink()
    dec = parse_config(dst / "ctc_decoder" / "config.pbtxt")
    assert dec.parameters["stream_idle_timeout_s"].string_value == "2.5"
    assert (
        dec.parameters["beam_size"].string_value
        == parse_config(REPOSITORY / "ctc_decoder" / "config.pbtxt")
        .parameters["beam_size"]
        .string_value
    )
    fe = parse_config(dst / "feature_extractor" / "config.pbtxt")
    assert fe.sequence_batching.max_sequence_idle_microseconds == 7_000_000


# -- the spec (streamasr.triton.spec) the configs are generated from ---------------------


def test_the_committed_configs_are_the_specs_byte_for_byte():
    """Every committed config.pbtxt is the spec's text (regenerate: `make repository`),
    that text parses to the spec's model field for field, and the spec declares no model
    the repository lacks."""
    from streamasr.triton import spec

    configs = spec.check()
    committed = {p.parent.name: p for p in REPOSITORY.glob("*/config.pbtxt")}
    assert sorted(configs) == sorted(committed)
    for rel, text in spec.rendered().items():
        path = REPOSITORY / rel
        assert path.read_text() == text, f"{path} differs from the spec: run `make repository`"
        assert parse_config(path) == configs[path.parent.name]


def test_spec_check_names_the_file_that_differs(tmp_path, caplog):
    from streamasr.triton import spec

    for rel, text in spec.rendered().items():
        (tmp_path / rel).parent.mkdir(parents=True)
        (tmp_path / rel).write_text(text)
    assert spec.main([str(tmp_path), "--check"]) == 0
    stale = tmp_path / "ctc_decoder" / "config.pbtxt"
    stale.write_text(stale.read_text().replace('"16"', '"8"'))
    (tmp_path / "model_contract" / "config.pbtxt").unlink()
    caplog.clear()
    assert spec.main([str(tmp_path), "--check"]) == 1
    named = [r.getMessage().split()[0] for r in caplog.records]
    assert named == [str(stale), str(tmp_path / "model_contract" / "config.pbtxt")]
    assert spec.main([str(tmp_path), "--write"]) == 0
    assert spec.differing(tmp_path) == []


def refused(models) -> str:
    from streamasr.triton import spec

    with pytest.raises(spec.SpecError) as err:
        spec.check(models)
    return str(err.value)


def test_spec_refuses_a_window_count_above_the_acoustic_batch():
    from streamasr.triton import spec

    for model, key in spec.ACOUSTIC_BATCH_BOUNDED:
        m = next(m for m in spec.REPOSITORY if m.name == model)
        bad = spec.with_model(m.with_parameters(**{key: 33}))
        assert f"{model} {key} 33 exceeds acoustic_model max_batch_size 32" in refused(bad)


def test_spec_refuses_a_stream_ttl_triton_would_outlive_or_undercut():
    from streamasr.triton import spec

    fe, dec = spec.FEATURE_EXTRACTOR, spec.CTC_DECODER
    # our TTL must fire before Triton forgets the sequence (60 s)
    too_long = spec.with_model(fe.with_parameters(stream_idle_timeout_s=60))
    assert "stream_idle_timeout_s (60) must be shorter than" in refused(too_long)
    # the decoder must not forget a stream the feature step still serves
    short_decoder = spec.with_model(dec.with_parameters(stream_idle_timeout_s=20))
    problem = refused(short_decoder)
    assert "ctc_decoder stream_idle_timeout_s 20 is shorter than feature_extractor's 30" in problem
    assert problem.count("streaming_asr") == 2  # both ensembles say it
    spec.check(spec.with_model(dec.with_parameters(stream_idle_timeout_s=45)))  # longer: fine


def test_spec_refuses_a_later_step_holding_fewer_streams():
    from streamasr.triton import spec

    bad = spec.with_model(spec.CTC_DECODER.with_parameters(max_streams=100))
    assert "ctc_decoder max_streams 100 is below feature_extractor's 4096" in refused(bad)


def test_spec_refuses_miswired_ensembles():
    from dataclasses import replace

    from streamasr.triton import spec

    ens = spec.STREAMING_ASR
    fe_step, am_step, dec_step = ens.steps

    def with_steps(*steps):
        return tuple(replace(ens, steps=steps) if m is ens else m for m in spec.REPOSITORY)

    unknown = replace(dec_step, inputs={**dec_step.inputs, "LOGITS": "log_probs"})
    assert "ctc_decoder has no input 'LOGITS'" in refused(with_steps(fe_step, am_step, unknown))
    unmapped = replace(dec_step, inputs={"LOG_PROBS": "log_probs"})
    assert "required input 'STEP_INFO' is not mapped" in refused(
        with_steps(fe_step, am_step, unmapped)
    )
    # the decoder before the acoustic model: log_probs, produced later, read first
    early = refused(with_steps(fe_step, dec_step, am_step))
    assert "'log_probs' is used before a step produces it" in early
    # STEP_INFO (strings) where the decoder reads float log-probs
    crossed = replace(dec_step, inputs={"LOG_PROBS": "step_info", "STEP_INFO": "step_info"})
    assert "'step_info' has another data type than 'LOG_PROBS'" in refused(
        with_steps(fe_step, am_step, crossed)
    )
    lost = tuple(m for m in spec.REPOSITORY if m is not spec.FINAL_PASS)
    assert "step 'final_pass' is not in the repository" in refused(lost)
    assert "models declared twice: ctc_decoder" in refused((*spec.REPOSITORY, spec.CTC_DECODER))
    orphan = spec.with_model(spec.OFFLINE_ASR.with_parameters(decoder_model="acoustic_model"))
    assert "offline_asr decoder_model 'acoustic_model' is not a streamasr_ctc_decoder" in (
        refused(orphan)
    )
