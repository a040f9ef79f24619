"""Training the TGS reconstructor on the Shapes world: learning, bit-exact resume, export, DDP, config."""

import json

import pytest
import torch

from gen3d.models.tgs import TGS, load_tgs
from gen3d.world.train_recon import ReconTrainConfig, ReconTrainer
from gen3d.world.trainer import parameter_checksum, run_distributed


def small(tmp_path, **overrides) -> ReconTrainConfig:
    args = dict(model="tiny", objects=2, views=4, size=16, points=256, steps=6, batch_size=2, target_views=2, warmup=2,
                backend="torch", checkpoint_every=3, sample_every=0, progress=False, threads=1, seed=3,
                work_dir=str(tmp_path / "work"), output=str(tmp_path / "out"))
    return ReconTrainConfig(**{**args, **overrides})


def fixed_batch(trainer: ReconTrainer) -> dict:
    g = torch.Generator().manual_seed(123)
    objects = torch.tensor([0, 1, 0, 1])
    inputs = torch.randint(0, trainer.cfg.views, (4,), generator=g)
    targets = torch.stack([torch.randperm(trainer.cfg.views, generator=g)[:2] for _ in range(4)])
    return trainer.make_batch(objects, inputs, targets)


def test_short_run_lowers_the_loss_on_a_fixed_batch(tmp_path):
    trainer = ReconTrainer(small(tmp_path, steps=30, lr=1e-3, warmup=0, sample_every=30))
    trainer.build_data()
    batch = fixed_batch(trainer)
    with torch.no_grad():
        before, terms_before = trainer.loss(batch)
    trainer.fit()
    with torch.no_grad():
        after, terms_after = trainer.loss(batch)
    assert after < 0.5 * before, (terms_before, terms_after)
    assert terms_after["chamfer_coarse"] < terms_before["chamfer_coarse"]
    assert terms_after["chamfer"] < terms_before["chamfer"]
    assert (tmp_path / "work" / "samples" / "step-000030.png").is_file()
    assert trainer.step == 30


def test_resume_continues_bit_for_bit(tmp_path):
    full = ReconTrainer(small(tmp_path / "a"))
    full.fit()

    cfg = small(tmp_path / "b")
    first = ReconTrainer(cfg)
    first.build_data()
    for _ in range(2):
        first.train_step()
    first.save_checkpoint()  # "interrupted" after step 2
    first.train_step()  # work after the checkpoint is lost
    resumed = ReconTrainer(cfg)
    assert resumed.resume() and resumed.step == 2
    resumed.fit()
    assert resumed.step == full.step == 6
    a, b = dict(full.model.named_parameters()), dict(resumed.model.named_parameters())
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(full.generator.get_state(), first.generator.get_state())
    assert torch.equal(full.generator.get_state(), resumed.generator.get_state())


def test_scaled_worlds_look_the_same_from_scaled_cameras(tmp_path):
    """Scale augmentation: surface points project to the same pixels of every view, and the batch draws its scales
    in scale_range (log-uniform, from the trainer's generator)."""
    from gen3d.models.tgs import project_points

    trainer = ReconTrainer(small(tmp_path, scale_range=(0.5, 2.0), batch_size=64))
    trainer.build_data()
    objects, inputs, targets = torch.tensor([0, 1]), torch.tensor([0, 2]), torch.tensor([[1, 3], [0, 1]])
    plain = trainer.make_batch(objects, inputs, targets)
    scaled = trainer.make_batch(objects, inputs, targets, torch.tensor([0.6, 1.7]))
    assert torch.equal(plain["image"], scaled["image"]) and torch.equal(plain["target_rgb"], scaled["target_rgb"])
    assert torch.allclose(scaled["points"][1], 1.7 * plain["points"][1])
    assert torch.allclose(scaled["cameras"].distance, plain["cameras"].distance * torch.tensor([0.6, 1.7]))
    a, b = plain["cameras"], scaled["cameras"]
    uv_a, z_a = project_points(plain["points"], a.c2w, a.K)
    uv_b, z_b = project_points(scaled["points"], b.c2w, b.K)
    assert torch.allclose(uv_a, uv_b, atol=1e-4) and torch.allclose(z_b, z_a * torch.tensor([0.6, 1.7])[:, None])
    t = scaled["target_cameras"][1]
    uv_t, _ = project_points(scaled["points"][1:].expand(2, -1, -1), t.c2w, t.K)
    uv_p, _ = project_points(plain["points"][1:].expand(2, -1, -1), plain["target_cameras"][1].c2w,
                             plain["target_cameras"][1].K)
    assert torch.allclose(uv_t, uv_p, atol=1e-4)
    distances = trainer.batch()["cameras"].distance  # orbit distances 1.7-2.1 times scales in [0.5, 2]
    assert distances.min() >= 0.5 * 1.7 - 1e-4 and distances.max() <= 2.0 * 2.1 + 1e-4
    assert distances.max() / distances.min() > 2  # the range is used


def test_export_reloads_to_the_same_outputs(tmp_path):
    trainer = ReconTrainer(small(tmp_path, steps=2, export_dtype="float32"))
    out = trainer.fit()
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert json.loads((out / "config.json").read_text())["num_points"] == trainer.model.cfg.num_points
    loaded = load_tgs(out)
    assert isinstance(loaded, TGS) and parameter_checksum(loaded) == parameter_checksum(trainer.model)
    batch = fixed_batch(trainer)
    trainer.model.eval()
    with torch.no_grad():
        want = trainer.model(batch["image"], batch["cameras"])
        got = loaded(batch["image"], batch["cameras"])
    for name in ("coarse_points", "points", "means", "log_scales", "quats", "opacity_logits", "sh"):
        assert torch.equal(getattr(want, name), getattr(got, name)), name


def test_float16_export_is_half_the_size_and_loads_in_float32(tmp_path):
    from safetensors.torch import load_file

    trainer = ReconTrainer(small(tmp_path, steps=1))  # export_dtype defaults to float16
    out = trainer.fit()
    stored = load_file(str(out / "model.safetensors"))
    assert all(v.dtype == torch.float16 for v in stored.values() if v.is_floating_point())
    full = sum(v.numel() * v.element_size() for v in trainer.model.state_dict().values())
    assert (out / "model.safetensors").stat().st_size < 0.55 * full
    loaded = load_tgs(out)
    for name, value in loaded.state_dict().items():
        assert value.dtype == torch.float32
        assert torch.equal(value, trainer.model.state_dict()[name].half().float()), name


def test_two_processes_with_gloo_agree(tmp_path):
    cfg = small(tmp_path, steps=3, checkpoint_every=100, export_dtype="float32")
    torch.manual_seed(cfg.seed)
    initial = parameter_checksum(TGS(cfg.tgs_config()))
    sums = run_distributed(ReconTrainer, cfg, 2, timeout=120)
    assert sorted(sums) == [0, 1]
    assert sums[0] == sums[1]  # DDP kept the ranks identical
    assert sums[0] != initial  # and it trained
    assert parameter_checksum(load_tgs(tmp_path / "out")) == sums[0]
    work = tmp_path / "work"
    assert [p.name for p in (work / "checkpoints").iterdir()] == ["step-000003"]
    assert len((work / "metrics.jsonl").read_text().splitlines()) == 1  # one writer: rank 0
    assert not [p for p in tmp_path.rglob(".*")]  # no stray temporary files
    ckpt = torch.load(work / "checkpoints" / "step-000003" / "state.pt", weights_only=True)
    assert ckpt["world_size"] == 2 and len(ckpt["generators"]) == 2
    assert not torch.equal(*ckpt["generators"])  # each rank has its own data stream


@pytest.mark.parametrize("overrides, match", [
    (dict(model="huge"), "model"),
    (dict(views=0), "views"),
    (dict(target_views=5, views=4), "target_views"),
    (dict(batch_size=0), "batch_size"),
    (dict(lr=0.0), "lr"),
    (dict(lambda_rgb=-1.0), "lambda_rgb"),
    (dict(lambda_chamfer_coarse=0, lambda_chamfer=0, lambda_rgb=0, lambda_mask=0, lambda_color=0), "loss weight"),
    (dict(lambda_color=float("nan")), "lambda_color"),
    (dict(export_dtype="bfloat16"), "export_dtype"),
    (dict(checkpoint_every=0), "checkpoint_every"),
    (dict(size=4), "size"),
    (dict(work_dir=""), "work_dir"),
])
def test_config_errors(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        small(tmp_path, **overrides)


def test_cli_verb_trains_and_exports(tmp_path, capsys):
    from gen3d.cli import main

    args = ["world", "train-recon", "model=tiny", "objects=2", "views=4", "size=16", "points=256", "steps=3", "batch_size=2",
            "target_views=2", "warmup=1", "backend=torch", "sample_every=0", "progress=false", "threads=1",
            f"work_dir={tmp_path / 'work'}"]
    assert main([*args, f"output={tmp_path / 'one'}"]) == 0
    assert (tmp_path / "one" / "model.safetensors").is_file()
    assert main([*args, f"output={tmp_path / 'two'}", "--processes", "2"]) == 0
    assert load_tgs(tmp_path / "two") is not None
    assert main([*args, "--processes", "0"]) == 2
    assert "--processes must be >= 1" in capsys.readouterr().err
