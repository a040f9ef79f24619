"""Every guidance in every text-to-3D system, and the guidance's own state across interrupt + resume."""

import json

import numpy as np
import pytest
import torch

from gen3d.cli import main
from gen3d.runs import latest_checkpoint, resolve_run
from tests.systems.conftest import fast_overrides, straight_and_resumed


@pytest.mark.parametrize("system", ["dreamgaussian", "dreamfusion"])
@pytest.mark.parametrize("method", ["vsd", "cds", "asd"])
def test_guidance_runs_in_every_system(system, method, tiny_pixel_prior, tmp_path):
    out = tmp_path / "outputs"
    o = fast_overrides(tiny_pixel_prior, out, steps=3, system=system) + ["turntable_frames=0", "val_every=0"]
    assert main(["run", system, "prompt=a red mug", f"guidance.type={method}", "use_perp_neg=true", *o]) == 0
    run = resolve_run("@last", out)
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3] and all(np.isfinite(line["loss"]) for line in lines)
    extra = {"vsd": "lora_loss", "cds": "t_less", "asd": "t_plus"}[method]
    assert all(extra in line for line in lines)
    state = torch.load(latest_checkpoint(run).path / "state.pt", weights_only=True)
    assert ("guidance" in state) == (method in ("vsd", "cds"))  # the LoRA estimator, the fixed noise


@pytest.mark.parametrize("method", ["vsd", "cds"])
def test_interrupted_and_resumed_run_matches_uninterrupted(method, tiny_pixel_prior, tmp_path):
    """The guidance's state (VSD's LoRA and its optimizer, CDS's fixed noise) is checkpointed and restored."""
    straight, resumed = straight_and_resumed("dreamgaussian", tiny_pixel_prior, tmp_path, steps=6, stop_at=3,
                                             overrides=[f"guidance.type={method}", "guidance.vsd.lr=0.01"])
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    for p, q in zip(straight.guidance.state_dict().get("params", []), resumed.guidance.state_dict().get("params", [])):
        assert torch.equal(p, q)


def test_unknown_guidance_is_one_line(tiny_pixel_prior, tmp_path, capsys):
    o = fast_overrides(tiny_pixel_prior, tmp_path / "out")
    assert main(["run", "dreamgaussian", "prompt=a red mug", "guidance.type=dds", *o]) != 0
    err = capsys.readouterr().err
    assert "guidance.type must be one of sds, vsd, cds, asd" in err
    assert main(["run", "dreamgaussian", "prompt=a red mug", "use_perp_neg=true", "view_dependent=false", *o]) != 0
    assert "use_perp_neg=true needs view_dependent=true" in capsys.readouterr().err
