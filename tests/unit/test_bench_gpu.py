"""`make bench-gpu` without a GPU: it must stop at once and say why; its argument checks
and its table are plain code, checked here (the GPU run itself needs a GPU machine)."""

from __future__ import annotations

import pytest

from benchmarks import gpu


def test_without_a_gpu_it_stops_clearly(monkeypatch, capsys):
    monkeypatch.setattr(gpu.shutil, "which", lambda name: None)
    with pytest.raises(gpu.NotReady, match="nvidia-smi"):
        gpu.check_gpu()
    assert gpu.main(["--check"]) == 2
    assert "not run: no GPU" in capsys.readouterr().err


def test_arguments_and_the_time_budget():
    a = gpu.parse_args([])
    assert a.chunks_ms == [160.0, 400.0] and a.budget_ms == 100.0
    a = gpu.parse_args(["--levels", "4,8", "--chunks-ms", "160", "--duration", "10"])
    assert (a.levels, a.chunks_ms, a.duration) == ([4, 8], [160.0], 10.0)
    with pytest.raises(SystemExit):
        gpu.parse_args(["--levels", "8,-1"])
    with pytest.raises(SystemExit):  # 12 levels x 2 chunks x 60 s: over 8 minutes
        gpu.parse_args(["--levels", ",".join(str(8 * i) for i in range(1, 13)), "--duration", "60"])


def test_table_and_files(tmp_path):
    level = {
        "streams": 32,
        "chunk_latency_ms": {"p50": 20.0, "p99": 80.0},
        "errors": 0,
        "within_budget": True,
        "server": {"acoustic_model": {"mean_batch": 6.5}},
    }
    res = {
        "host": "h",
        "started": "2026-12-03T15:00:00Z",
        "cpu_count": 16,
        "wall_s": 400.0,
        "budget_ms": 100.0,
        "gpu": {"gpus": ["NVIDIA H200, 143771 MiB, 570.0"], "onnxruntime": "1.32.0"},
        "raw": {"1": {"median_ms": 2.0, "windows_per_s": 500.0}},
        "paced": {"160": {"levels": [level], "held_streams": 32}},
    }
    json_path, md_path = gpu.write(res, tmp_path)
    md = md_path.read_text()
    assert json_path.name == "h-20261203-1500.json"
    assert "| 160 | 32 | 20.0 | 80.0 | 0 | 6.5 | yes |" in md
    assert "| 160 | **32** |" in md and "| 1 | 2.00 | 500 |" in md
