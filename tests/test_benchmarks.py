"""The benchmark scripts run (in their --quick form) and print the JSON they promise. No timing is asserted."""

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_bench_shapes_quick(capsys):
    report = load("bench_shapes").main(["--quick", "--override", "max_steps=4", "cameras.batch_size=2"])
    printed = json.loads(capsys.readouterr().out)
    assert printed["summary"] == report["summary"]
    row = report["seen"][0]
    for key in ("iou_3d", "silhouette_iou", "color_error", "seconds", "init"):
        assert key in row
    assert 0.0 <= row["iou_3d"] <= 1.0 and report["held_out"]


@pytest.mark.slow
def test_bench_prior_samples_quick(capsys):
    report = load("bench_prior_samples").main(["--quick", "--samples", "1"])
    assert json.loads(capsys.readouterr().out)["summary"] == report["summary"]
    assert {"seen", "held_out"} <= set(report["summary"])
    assert report["summary"]["seen"]["ground_truth_silhouette_iou"] > 0.5
