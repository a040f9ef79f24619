"""The Zero123-style view-conditioned prior: relative poses, a tiny training run, export, loading,
classifier-free guidance, resume, and loading errors."""

import json
import math
import shutil

import pytest
import torch

from gen3d.errors import PriorNotAvailable
from gen3d.priors import view_conditioning
from gen3d.priors.sampling import sample_novel_views
from gen3d.priors.view_conditioning import CameraProjection, ViewConditionedPrior, relative_pose
from gen3d.world.train_view_prior import PairBatch, ViewPriorTrainConfig, ViewPriorTrainer

TINY = {"steps": 30, "batch_size": 4, "views_per_object": 4, "max_objects": 2, "block_out_channels": [16, 16, 32],
        "embed_dim": 32, "image_layers": 1, "warmup": 5, "sample_every": 0, "checkpoint_every": 1000, "progress": False}



@pytest.fixture(scope="module")
def views(tmp_path_factory):
    """The rendered pair data of the tiny config (2 objects x 4 views), built once."""
    trainer = ViewPriorTrainer(ViewPriorTrainConfig(**TINY, work_dir=str(tmp_path_factory.mktemp("data"))))
    trainer.build_data()
    return trainer.data


def _trainer(tmp_path, views, **overrides) -> ViewPriorTrainer:
    paths = {"output": str(tmp_path / "prior"), "work_dir": str(tmp_path / "work")}
    cfg = ViewPriorTrainConfig(**{**TINY, **paths, **overrides})
    trainer = ViewPriorTrainer(cfg)
    trainer.data = views
    return trainer


@pytest.fixture(scope="module")
def trained(tmp_path_factory, views):
    """A folder exported by a 30-step tiny training run."""
    root = tmp_path_factory.mktemp("trained")
    return _trainer(root, views).fit()


# ---------------------------------------------------------------- relative pose


def test_relative_pose_values():
    pose = relative_pose(10.0, 30.0, 2.0, 40.0, 120.0, 2.5)
    assert pose.shape == (1, 4)
    assert torch.allclose(pose[0], torch.tensor([math.radians(30.0), 1.0, 0.0, 0.5]), atol=1e-6)
    identity = relative_pose(torch.tensor([5.0, -10.0]), torch.tensor([0.0, 170.0]), 2.2, torch.tensor([5.0, -10.0]),
                             torch.tensor([0.0, 170.0]), 2.2)
    assert torch.allclose(identity, torch.tensor([[0.0, 0.0, 1.0, 0.0]] * 2), atol=1e-6)
    back = relative_pose(0.0, 0.0, 2.0, -10.0, 180.0, 2.0)[0]
    assert torch.allclose(back, torch.tensor([math.radians(-10.0), 0.0, -1.0, 0.0]), atol=1e-6)


def test_relative_pose_is_periodic_in_azimuth():
    azim = torch.linspace(-180.0, 180.0, 13)
    base = relative_pose(15.0, 20.0, 2.0, 30.0, azim, 2.4)
    for turn in (-720.0, -360.0, 360.0):
        assert torch.allclose(relative_pose(15.0, 20.0 + turn, 2.0, 30.0, azim, 2.4), base, atol=1e-5)
        assert torch.allclose(relative_pose(15.0, 20.0, 2.0, 30.0, azim + turn, 2.4), base, atol=1e-5)
    assert torch.allclose(base[:, 1] ** 2 + base[:, 2] ** 2, torch.ones(13), atol=1e-6)


def test_camera_projection_layouts():
    embeds, pose, patches = torch.randn(3, 8), torch.randn(3, 4), torch.randn(3, 16, 8)
    single = CameraProjection(image_dim=8, patch_dim=8, token_dim=8, tokens="single")
    assert torch.equal(single(embeds, pose), embeds[:, None])  # Zero123's init: identity, pose weights zero
    tokens = CameraProjection(image_dim=8, patch_dim=8, token_dim=8, hidden_dim=16, tokens="patches")(embeds, pose, patches)
    assert tokens.shape == (3, 17, 8)
    with pytest.raises(ValueError, match="tokens"):
        CameraProjection(tokens="both")


def test_render_views_default_unchanged():
    from gen3d.world.catalog import training_objects
    from gen3d.world.train_prior import render_views

    obj = training_objects()[0]
    plain = render_views(obj, 2, 8, 1, torch.Generator().manual_seed(0))
    extra = render_views(obj, 2, 8, 1, torch.Generator().manual_seed(0), return_cameras=True)
    assert len(plain) == 3 and len(extra) == 4
    assert torch.equal(plain[0], extra[0]) and torch.equal(plain[1], extra[1]) and plain[2] == extra[2]
    assert extra[3].azimuth.shape == (2,)


# ---------------------------------------------------------------- training, export, loading


def test_trained_folder_loads_and_guides(trained):
    index = json.loads((trained / "model_index.json").read_text())
    assert index["cc_projection"] == ["gen3d.priors.view_conditioning", "CameraProjection"]
    assert {"unet", "scheduler", "image_encoder", "cc_projection"} <= set(index)
    card = json.loads((trained / "gen3d_prior.json").read_text())
    assert card["steps"] == 30 and card["held_out"]

    prior = ViewConditionedPrior.from_pretrained(str(trained))
    assert prior.resolution == 32 and prior.num_train_timesteps == 1000 and prior.alphas_cumprod.shape == (1000,)
    assert not any(p.requires_grad for p in prior.unet.parameters())
    cond = _check_guidance(prior)
    assert cond.tokens.shape == (3, 1, 32)  # the default layout: Zero123's single token
    moved = prior.repose(cond, relative_pose(15.0, 0.0, 2.2, 15.0, torch.tensor([270.0, 90.0, 0.0]), 2.2))
    assert torch.allclose(moved.tokens[1], cond.tokens[1]) and not torch.allclose(moved.tokens[0], cond.tokens[0])

    pose = relative_pose(15.0, 0.0, 2.2, 15.0, torch.tensor([90.0, 180.0]), 2.2)
    images = sample_novel_views(prior, torch.rand(2, 32, 32, 3), pose, steps=2, generator=torch.Generator().manual_seed(0))
    assert images.shape == (2, 32, 32, 3) and 0 <= images.min() and images.max() <= 1


@pytest.mark.parametrize("variant", [{"tokens": "patches"}, {"pose_embedding": False}])
def test_other_layouts_export_load_and_guide(tmp_path, views, variant):
    prior = ViewConditionedPrior.from_pretrained(str(_trainer(tmp_path, views, **variant).export()))
    cond = _check_guidance(prior)
    assert cond.tokens.shape == ((3, 17, 32) if variant.get("tokens") == "patches" else (3, 1, 32))
    assert (prior.unet.class_embedding is not None) == variant.get("pose_embedding", True)


def _check_guidance(prior, s: float = 3.0):
    """predict_noise's guided epsilon is eps_u + s (eps_c - eps_u) of two separate UNet calls."""
    pose = relative_pose(15.0, 0.0, 2.2, 15.0, torch.tensor([0.0, 90.0, 180.0]), 2.2)
    cond = prior.encode_condition(torch.rand(1, 48, 48, 3), pose)  # one image, three poses, resized
    assert cond.image.shape == (3, 3, 32, 32)
    x0 = prior.encode(torch.rand(3, 32, 32, 3))
    t = torch.tensor([50, 400, 900])
    x_t = prior.add_noise(x0, torch.randn_like(x0), t)
    out = prior.predict_noise(x_t, t, cond, guidance_scale=s)
    embed = prior.unet.class_embedding is not None
    with torch.no_grad():
        eps_c = prior.unet(torch.cat([x_t, cond.image], 1), t, encoder_hidden_states=cond.tokens,
                           class_labels=pose if embed else None).sample
        eps_u = prior.unet(torch.cat([x_t, torch.zeros_like(x_t)], 1), t,
                           encoder_hidden_states=torch.zeros_like(cond.tokens),
                           class_labels=torch.zeros_like(pose) if embed else None).sample
    assert torch.allclose(out.eps_cond, eps_c, atol=1e-5) and torch.allclose(out.eps_uncond, eps_u, atol=1e-5)
    assert torch.allclose(out.eps_guided, eps_u + s * (eps_c - eps_u), atol=1e-5)
    assert not torch.allclose(eps_c, eps_u, atol=1e-4)
    return cond

def test_resume_is_bit_exact(tmp_path, views):
    straight = _trainer(tmp_path / "a", views, steps=6)
    for _ in range(6):
        straight.train_step()
    first = _trainer(tmp_path / "b", views, steps=6)
    for _ in range(3):
        first.train_step()
    first.save_checkpoint()
    second = _trainer(tmp_path / "b", views, steps=6)
    assert second.resume() and second.step == 3
    for _ in range(3):
        second.train_step()
    a, b = straight._params(), second._params()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(straight.ema[k], second.ema[k]) for k in a)


def test_loss_decreases_on_a_fixed_pair(tmp_path, views):
    trainer = _trainer(tmp_path, views, lr=2e-3, warmup=1, steps=100, cond_dropout=0.0)
    o, i, j = torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.long), torch.ones(4, dtype=torch.long)
    d = views
    pose = relative_pose(d["elevation"][o, i], d["azimuth"][o, i], d["distance"][o, i],
                         d["elevation"][o, j], d["azimuth"][o, j], d["distance"][o, j])
    batch = PairBatch(trainer.view(o, i), trainer.view(o, j), pose, torch.ones(4))
    g = torch.Generator().manual_seed(5)
    t, eps = torch.randint(0, 1000, (4,), generator=g), torch.randn(batch.targets.shape, generator=g)

    def held_loss() -> float:
        with torch.no_grad():
            return trainer.loss(batch, t, eps).item()

    before = held_loss()
    for _ in range(100):
        trainer.train_step(batch)
    assert held_loss() < 0.5 * before


# ---------------------------------------------------------------- errors


def test_bad_folders_raise_prior_not_available(tmp_path, trained, monkeypatch):
    with pytest.raises(PriorNotAvailable, match="no model_index.json"):
        ViewConditionedPrior.from_pretrained(str(tmp_path))
    broken = tmp_path / "broken"
    shutil.copytree(trained, broken)
    shutil.rmtree(broken / "cc_projection")
    with pytest.raises(PriorNotAvailable, match="no 'cc_projection/' subfolder"):
        ViewConditionedPrior.from_pretrained(str(broken))
    index = json.loads((trained / "model_index.json").read_text())
    (broken / "model_index.json").write_text(json.dumps({**index, "cc_projection": ["os", "system"]}))
    with pytest.raises(PriorNotAvailable, match="gen3d loads it only from"):
        ViewConditionedPrior.from_pretrained(str(broken))
    (broken / "model_index.json").write_text(json.dumps({k: v for k, v in index.items() if k != "image_encoder"}))
    with pytest.raises(PriorNotAvailable, match="no 'image_encoder' component"):
        ViewConditionedPrior.from_pretrained(str(broken))
    with pytest.raises(PriorNotAvailable, match="shapes-zero123"):
        ViewConditionedPrior.from_pretrained("nobody/not-a-cached-model")
    monkeypatch.setitem(view_conditioning.EMBEDDED_VIEW_PRIORS, "gen3d/shapes-zero123", tmp_path / "missing")
    with pytest.raises(PriorNotAvailable, match="gen3d world train-view-prior"):
        ViewConditionedPrior.from_pretrained("gen3d/shapes-zero123")
