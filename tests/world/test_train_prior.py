"""The embedded prior's trainer: tiny real runs, resume, export through the hub loading path."""

import json

import torch

from gen3d.priors.diffusion import DiffusionPrior
from gen3d.priors.sampling import sample_images
from gen3d.world.train_prior import PriorTrainConfig, PriorTrainer, render_views, sample_prompts

TINY = dict(batch_size=4, views_per_object=2, max_objects=3, block_out_channels=[8, 16, 16], text_dim=16,
            sample_every=0, checkpoint_every=3, progress=False, warmup=2)


def tiny(tmp_path, **kw):
    return PriorTrainConfig(output=str(tmp_path / "out"), work_dir=str(tmp_path / "work"), **{**TINY, **kw})


def test_render_views_are_premultiplied_and_labelled():
    from gen3d.world.catalog import WorldObject

    premult, alpha, dirs = render_views(WorldObject("mug", "red"), 6, 16, 2, torch.Generator().manual_seed(0))
    assert premult.shape == (6, 3, 16, 16) and alpha.shape == (6, 1, 16, 16)
    assert (premult <= alpha + 1e-5).all() and 0.05 < alpha.mean() < 0.9
    assert set(dirs) <= {"front", "side", "back", "overhead"}


def test_train_export_and_load_as_a_hub_model(tmp_path):
    trainer = PriorTrainer(tiny(tmp_path, steps=6))
    out = trainer.fit()
    assert (out / "model_index.json").is_file() and (out / "gen3d_prior.json").is_file()
    card = json.loads((out / "gen3d_prior.json").read_text())
    assert card["steps"] == 6 and card["held_out"]
    prior = DiffusionPrior.from_pretrained(str(out))
    assert not prior.is_latent and prior.resolution == 32
    images = sample_images(prior, ["a red mug", "a teal torus, front view"], steps=3,
                           generator=torch.Generator().manual_seed(0))
    assert images.shape == (2, 32, 32, 3) and images.min() >= 0 and images.max() <= 1
    lines = (tmp_path / "work" / "metrics.jsonl").read_text().splitlines()
    assert lines == [] or json.loads(lines[-1])["step"] <= 6


def test_resume_matches_an_uninterrupted_run(tmp_path):
    straight = PriorTrainer(tiny(tmp_path / "a", steps=6))
    straight.fit()
    first = PriorTrainer(tiny(tmp_path / "b", steps=6))
    first.build_data()
    for _ in range(3):
        first.train_step()
    first.save_checkpoint()
    second = PriorTrainer(tiny(tmp_path / "b", steps=6))
    assert second.resume() and second.step == 3
    second.fit()
    a = {**straight._params(), **{f"ema.{k}": v for k, v in straight.ema.items()}}
    b = {**second._params(), **{f"ema.{k}": v for k, v in second.ema.items()}}
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_training_lowers_the_loss(tmp_path):
    trainer = PriorTrainer(tiny(tmp_path, steps=60, lr=2e-3, max_objects=1, views_per_object=4, cond_dropout=0.0))
    trainer.build_data()
    losses = [trainer.train_step() for _ in range(60)]
    assert sum(losses[-10:]) / 10 < 0.6 * sum(losses[:10]) / 10


def test_sample_prompts_cover_every_shape_and_held_out_pair():
    from gen3d.world.catalog import HELD_OUT, SHAPES, parse_prompt

    parsed = [parse_prompt(p) for p in sample_prompts()]
    assert {o.shape for o in parsed} == set(SHAPES)
    assert {(o.color, o.shape) for o in parsed} >= set(HELD_OUT)


def test_min_snr_weighting(tmp_path):
    """γ = 0 is plain ε-MSE; with γ, noisy timesteps (SNR < γ) keep weight 1, clean ones get γ / SNR."""
    import torch.nn.functional as F

    plain = PriorTrainer(tiny(tmp_path, min_snr_gamma=0.0))
    weighted = PriorTrainer(tiny(tmp_path, min_snr_gamma=5.0))
    g = torch.Generator().manual_seed(0)
    pred, eps = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    t = torch.tensor([900, 10])  # SNR well below 5, and far above it
    assert torch.allclose(plain.diffusion_loss(pred, eps, t), F.mse_loss(pred, eps))
    snr = weighted.abar[t] / (1 - weighted.abar[t])
    assert snr[0] < 5 < snr[1]
    per = (pred - eps).pow(2).flatten(1).mean(1)
    expected = (per[0] + per[1] * 5 / snr[1]) / 2
    assert torch.allclose(weighted.diffusion_loss(pred, eps, t), expected)
