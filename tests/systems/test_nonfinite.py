"""NaN/Inf in a step: skipped (no update, no densification statistics), counted, and a run that keeps producing
them stops with advice, its last checkpoint intact. Faults are injected at chosen steps through a loss term: a
NaN term (a non-finite loss), or a zero-valued term whose gradient hook returns NaN (a finite loss with a
non-finite gradient); a real guidance scale of 1e38 makes every loss infinite."""

import json

import pytest
import torch
from safetensors.torch import load_file

from gen3d.cli import load_run_config, main
from gen3d.errors import Gen3dError
from gen3d.runs import checkpoint_dirs, new_run_dir
from gen3d.systems.base import write_config
from gen3d.systems.dreamfusion import DreamFusion
from gen3d.systems.dreamgaussian import DreamGaussian
from tests.systems.conftest import fast_overrides


def faulty(base):
    class Faulty(base):
        """`base` whose steps in `nan_loss` get a NaN loss and in `nan_grad` a NaN gradient (loss unchanged)."""

        nan_loss: set[int] = set()
        nan_grad: set[int] = set()

        def extra_losses(self, step):
            terms = super().extra_losses(step)
            param = next(p for p in self.optimizer.param_groups[0]["params"])
            if step in self.nan_loss:
                terms["fault"] = param.sum() * float("nan")
            if step in self.nan_grad:
                zero = param.sum() * 0.0
                zero.register_hook(lambda g: torch.full_like(g, float("nan")))
                terms["fault"] = zero
            return terms

    return Faulty


def make(cls, prior, tmp_path, steps, *overrides, system="dreamgaussian"):
    o = fast_overrides(prior, tmp_path / "outputs", steps=steps, system=system)
    _, cfg = load_run_config(system, ["prompt=a red mug", *o, "turntable_frames=0", "exports=[]", "val_every=0",
                                      *overrides])
    run = new_run_dir(cfg.output_dir, cls.name, cfg.prompt)
    write_config(run, cfg)
    return cls(cfg, run)


def params(system) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in system.model_tensors().items()}


@pytest.mark.parametrize("fault", ["nan_loss", "nan_grad"])
def test_a_nonfinite_step_changes_nothing(fault, tiny_pixel_prior, tmp_path):
    system = make(faulty(DreamGaussian), tiny_pixel_prior, tmp_path, 8, "densify.densify_every=3")
    setattr(system, fault, {4})
    system.fit(stop_at=3)
    before = params(system)
    stats = {k: v.clone() for k, v in system.strategy.state_dict().items()}
    adam = [s["step"].clone() for s in system.optimizer.state.values()]
    system.fit(stop_at=4)  # step 4: skipped
    after = params(system)
    assert after.keys() == before.keys()
    for k in before:
        assert torch.equal(after[k], before[k]), k
    for k, v in system.strategy.state_dict().items():  # no densification statistics from the skipped step
        assert torch.equal(v, stats[k]), k
    assert [s["step"] for s in system.optimizer.state.values()] == adam
    assert system.nonfinite_steps == 1
    system.fit(stop_at=5)  # and the next, good step updates again
    assert not torch.equal(params(system)["means"], before["means"])


def test_isolated_nonfinite_steps_are_skipped_and_the_run_finishes(tiny_pixel_prior, tmp_path):
    clean = make(DreamGaussian, tiny_pixel_prior, tmp_path / "clean", 8)
    clean.fit()
    system = make(faulty(DreamGaussian), tiny_pixel_prior, tmp_path / "faulty", 8, "max_nonfinite_steps=2")
    system.nan_loss, system.nan_grad = {3, 6}, {5}  # at most two in a row: within max_nonfinite_steps=2
    system.fit()
    assert system.step == 8 and system.nonfinite_steps == 3
    final = load_file(str(checkpoint_dirs(system.run_dir)[-1] / "model.safetensors"))
    reference = clean.model_tensors()
    assert final.keys() == reference.keys()
    for k, v in final.items():
        assert torch.isfinite(v).all(), k
        assert v.shape[1:] == reference[k].shape[1:] and len(v) > 0, k
    records = [json.loads(line) for line in (system.run_dir / "metrics.jsonl").read_text().splitlines()]
    skipped = {r["step"]: r for r in records if "skipped" in r}
    assert sorted(skipped) == [3, 5, 6]
    assert skipped[3]["skipped"].startswith("the loss is nan")
    assert "the gradient of" in skipped[5]["skipped"] and "is not finite" in skipped[5]["skipped"]
    assert skipped[6]["nonfinite_steps"] == 3
    assert "step 5 skipped: the gradient of" in (system.run_dir / "log.txt").read_text()


@pytest.mark.parametrize("limit", [0, 2])
def test_persistent_nonfinite_steps_stop_with_the_checkpoint_intact(limit, tiny_pixel_prior, tmp_path):
    system = make(faulty(DreamGaussian), tiny_pixel_prior, tmp_path, 12, "checkpoint_every=2",
                  f"max_nonfinite_steps={limit}")
    system.nan_grad = set(range(5, 13))
    with pytest.raises(Gen3dError) as info:
        system.fit()
    message = str(info.value)
    last = checkpoint_dirs(system.run_dir)[-1]
    assert last.name == "step-000004"  # none written while steps were skipped
    assert "\n" not in message
    assert f"stopped at step {5 + limit}: {limit + 1} step(s) in a row had a non-finite loss or gradient" in message
    assert f"max_nonfinite_steps={limit}" in message and f"the last checkpoint ({last}) is intact" in message
    assert "lower the learning rates (gaussians.*_lr)" in message
    saved = load_file(str(last / "model.safetensors"))
    for k, v in saved.items():
        assert torch.isfinite(v).all(), k
        assert torch.equal(v, system.model_tensors()[k].detach().cpu()), k  # nothing moved after step 4


def test_a_field_run_skips_nonfinite_steps_too(tiny_pixel_prior, tmp_path):
    system = make(faulty(DreamFusion), tiny_pixel_prior, tmp_path, 3, system="dreamfusion")
    system.nan_grad = {2}
    system.fit(stop_at=1)
    before = params(system)
    system.fit(stop_at=2)
    for k, v in params(system).items():
        if k.startswith("field."):  # the renderer's occupancy grid is refreshed from the density, not by Adam
            assert torch.equal(v, before[k]), k
    system.fit()
    assert system.nonfinite_steps == 1
    assert all(torch.isfinite(v).all() for v in system.model_tensors().values())


def test_no_checkpoint_holds_nan(tiny_pixel_prior, tmp_path):
    system = make(DreamGaussian, tiny_pixel_prior, tmp_path, 2)
    system.fit()
    with torch.no_grad():
        system.model.means[0, 0] = float("nan")  # however it got there
    system.step = 3
    with pytest.raises(Gen3dError, match=r"the model holds NaN/Inf in \['means'\] at step 3: no checkpoint written"):
        system.save()
    assert checkpoint_dirs(system.run_dir)[-1].name == "step-000002"


def test_cli_run_that_turns_infinite_stops_with_advice(tiny_pixel_prior, tmp_path, capsys):
    """A real fault: guidance.guidance_scale=1e38 overflows every loss from the resumed step on."""
    out = tmp_path / "outputs"
    base = ["prompt=a red mug", *fast_overrides(tiny_pixel_prior, out, steps=4), "turntable_frames=0", "exports=[]"]
    assert main(["run", "dreamgaussian", *base]) == 0
    (run,) = out.glob("dreamgaussian/*")
    before = (run / "checkpoints" / "step-000004" / "model.safetensors").read_bytes()
    capsys.readouterr()
    assert main(["resume", str(run), "max_steps=8", "guidance.guidance_scale=1e38", "max_nonfinite_steps=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: stopped at step 6: 2 step(s) in a row had a non-finite loss or gradient "
                          "(last: the loss is inf; max_nonfinite_steps=1)"), err
    assert "step-000004) is intact; lower the learning rates" in err
    assert [p.name for p in checkpoint_dirs(run)][-1] == "step-000004"
    assert (run / "checkpoints" / "step-000004" / "model.safetensors").read_bytes() == before
    assert main(["run", "dreamgaussian", *base, "max_nonfinite_steps=-1"]) == 2
    assert "max_nonfinite_steps must be >= 0" in capsys.readouterr().err
