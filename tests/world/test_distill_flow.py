"""Distilling a point-set flow teacher into a few-step student: learning, resume, export, two processes, errors."""

import json

import pytest
import torch

from gen3d.models.point_flow import load_point_flow
from gen3d.world.train_flow import DistillConfig, DistillTrainer, FlowTrainConfig, FlowTrainer
from gen3d.world.trainer import parameter_checksum, run_distributed


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A tiny teacher trained on two objects (enough to be far from its 1-step self)."""
    root = tmp_path_factory.mktemp("teacher")
    cfg = FlowTrainConfig(objects=2, points=48, source_points=96, width=32, layers=1, heads=4, steps=200,
                          batch_size=8, lr=3e-3, warmup=0, ema=0.0, checkpoint_every=1000, progress=False,
                          threads=1, seed=1, export_dtype="float32", work_dir=str(root / "work"),
                          output=str(root / "out"))
    return FlowTrainer(cfg).fit()


def small(tmp_path, teacher, **overrides) -> DistillConfig:
    args = dict(teacher=str(teacher), objects=2, source_points=96, steps=4, batch_size=4, warmup=0, lr=1e-3,
                checkpoint_every=2, progress=False, threads=1, seed=2, export_dtype="float32",
                work_dir=str(tmp_path / "work"), output=str(tmp_path / "out"))
    return DistillConfig(**{**args, **overrides})


@pytest.mark.parametrize("method", ["mdt", "consistency"])
def test_a_short_run_trains_the_student_from_the_teacher(tmp_path, teacher, method):
    """The student starts as a copy of the teacher and moves; the losses are finite and logged. (That distillation
    gives one-step samples of the prompted object is tested on the shipped student, `tests/systems/test_sample.py`,
    and on the exact flow of Gaussian data, `tests/models/test_flow.py`.)"""
    trainer = DistillTrainer(small(tmp_path, teacher, method=method, steps=5, ema=0.0))
    start = parameter_checksum(trainer.model)
    assert start == parameter_checksum(trainer.teacher)
    trainer.fit()
    assert parameter_checksum(trainer.model) != start
    assert parameter_checksum(trainer.teacher) == start  # frozen
    assert not trainer.model.null_text.requires_grad  # the student is never asked for the null condition
    logged = [json.loads(line) for line in (tmp_path / "work" / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["step"] == 5 and all(torch.isfinite(torch.tensor(r["loss"])) for r in logged)
    assert trainer.last_terms.keys() == ({"vm", "vd"} if method == "mdt" else set())


def test_resume_continues_bit_for_bit_and_exports_a_student(tmp_path, teacher):
    full = DistillTrainer(small(tmp_path / "a", teacher))
    full.fit()
    cfg = small(tmp_path / "b", teacher)
    first = DistillTrainer(cfg)
    first.train_step()
    first.train_step()
    first.save_checkpoint()
    first.train_step()  # lost: after the checkpoint
    resumed = DistillTrainer(cfg)
    assert resumed.resume() and resumed.step == 2
    out = resumed.fit()
    assert parameter_checksum(full.model) == parameter_checksum(resumed.model)
    assert parameter_checksum(full.ema) == parameter_checksum(resumed.ema)
    info = json.loads((out / "latent.json").read_text())
    assert info["kind"] == "student (mdt)" and info["steps"] == 1 and info["guidance"] == 0 and info["points"] == 48
    student = load_point_flow(out)
    assert parameter_checksum(student.model) == parameter_checksum(resumed.ema)
    sample = student(["a red mug"])  # its defaults: one step, no guidance
    assert torch.allclose(sample, resumed.sample(["a red mug"], steps=1))


def test_two_processes_with_gloo_agree(tmp_path, teacher):
    cfg = small(tmp_path, teacher, steps=3, checkpoint_every=100)
    sums = run_distributed(DistillTrainer, cfg, 2, timeout=180)
    assert sorted(sums) == [0, 1] and sums[0] == sums[1]  # DDP kept the ranks identical (two forwards, one backward)
    assert sums[0] != parameter_checksum(load_point_flow(teacher).model)  # and it trained
    assert len((tmp_path / "work" / "metrics.jsonl").read_text().splitlines()) == 1


def test_a_student_is_not_a_teacher(tmp_path, teacher):
    student = DistillTrainer(small(tmp_path / "s", teacher, steps=1)).fit()
    with pytest.raises(ValueError, match="not a flow teacher"):
        DistillTrainer(small(tmp_path / "again", student))


def test_a_missing_teacher_says_what_to_pass(tmp_path):
    from gen3d.errors import PriorNotAvailable

    with pytest.raises(PriorNotAvailable, match="train-flow"):
        DistillTrainer(small(tmp_path, tmp_path / "nowhere"))


@pytest.mark.parametrize("overrides, match", [
    (dict(method="dmd"), "method"),
    (dict(delta=0.0), "delta"),
    (dict(d_norm=-1.0), "d_norm"),
    (dict(guidance_vm=float("nan")), "guidance_vm"),
    (dict(lambda_vm=0.0, lambda_vd=0.0), "lambda_vm or lambda_vd"),
    (dict(sample_steps=0), "sample_steps"),
    (dict(ema=1.0), "ema"),
])
def test_config_errors(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        small(tmp_path, tmp_path / "teacher", **overrides)
