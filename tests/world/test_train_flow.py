"""Training the point-set flow teacher on the Shapes world: data, learning, bit-exact resume, export, config."""

import json

import pytest
import torch

from gen3d.models.flow import flow_matching_loss
from gen3d.models.point_flow import PointFlowConfig, PointFlowTransformer
from gen3d.world.catalog import all_captions
from gen3d.world.train_flow import FlowTrainConfig, FlowTrainer, from_latent, to_latent


def small(tmp_path, **overrides) -> FlowTrainConfig:
    args = dict(objects=2, points=64, source_points=128, width=32, layers=1, heads=4, steps=6, batch_size=4,
                warmup=1, checkpoint_every=3, progress=False, threads=1, seed=3, export_dtype="float32",
                work_dir=str(tmp_path / "work"),
                output=str(tmp_path / "out"))
    return FlowTrainConfig(**{**args, **overrides})


def test_batches_are_subsets_of_the_objects_with_their_captions(tmp_path):
    trainer = FlowTrainer(small(tmp_path))
    x0, captions = trainer.batch()
    assert x0.shape == (4, 64, 6) and len(captions) == 4
    points, colors = from_latent(x0)
    assert colors.min() >= 0 and colors.max() <= 1 and points.abs().max() < 1
    for latent, text in zip(x0, captions):  # each example is a subset of one object's points, and its caption
        matches = [i for i in range(len(trainer.objects))
                   if (latent[:, None] == trainer.latents[i][None]).all(-1).any(1).all()]
        assert len(matches) == 1
        obj = trainer.objects[matches[0]]
        assert text in all_captions(obj.shape, obj.color)
        assert len(set(latent[:, 0].tolist())) == 64  # no point twice
        assert torch.allclose(to_latent(*from_latent(latent)), latent, atol=1e-6)
    emb = trainer.text(captions)
    assert emb.shape == (4, trainer.text.length, trainer.text.dim)


def test_training_lowers_the_flow_matching_loss(tmp_path):
    trainer = FlowTrainer(small(tmp_path, steps=150, lr=3e-3, warmup=0, p_uncond=0.0, ema=0.0))
    trainer.build_data()
    x0, captions = trainer.batch()

    def fixed_loss():  # the same times and noise each time
        with torch.no_grad():
            return flow_matching_loss(trainer.model, x0, trainer.text(captions), torch.Generator().manual_seed(0)).item()

    before = fixed_loss()
    trainer.fit()
    assert fixed_loss() < 0.7 * before


def test_resume_continues_bit_for_bit_and_exports(tmp_path):
    full = FlowTrainer(small(tmp_path / "a"))
    full.fit()
    cfg = small(tmp_path / "b")
    first = FlowTrainer(cfg)
    first.build_data()
    for _ in range(2):
        first.train_step()
    first.save_checkpoint()
    first.train_step()  # lost: after the checkpoint
    resumed = FlowTrainer(cfg)
    assert resumed.resume() and resumed.step == 2
    out = resumed.fit()
    for a, b in ((full.model, resumed.model), (full.ema, resumed.ema)):
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    # the export is the EMA model, loadable as a PointFlowTransformer
    from safetensors.torch import load_file

    model = PointFlowTransformer(PointFlowConfig(**json.loads((out / "config.json").read_text())))
    model.load_state_dict(load_file(str(out / "model.safetensors")))
    assert all(torch.equal(x, y) for x, y in zip(model.state_dict().values(), resumed.ema.state_dict().values()))
    assert json.loads((out / "latent.json").read_text())["points"] == 64
    sample = resumed.sample(["a red mug"], steps=2)
    assert sample.shape == (1, 64, 6) and torch.isfinite(sample).all()


@pytest.mark.parametrize("overrides, match", [
    (dict(points=300), "points"),
    (dict(p_uncond=1.0), "p_uncond"),
    (dict(ema=float("nan")), "ema"),
    (dict(lr=0.0), "lr"),
    (dict(batch_size=0), "batch_size"),
    (dict(work_dir=""), "work_dir"),
])
def test_config_errors(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        small(tmp_path, **overrides)
