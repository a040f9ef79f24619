"""4D recipes (issue 12): text-to-4D (dream4d) and image/video-to-4D (dreamgaussian4d) on the embedded priors."""

import json

import pytest
import torch

from gen3d.cli import load_run_config, main
from gen3d.runs import new_run_dir, resolve_run
from gen3d.systems.base import write_config
from gen3d.world.animation import AnimatedObject, save_clip
from gen3d.world.catalog import WorldObject

T2I = "gen3d/shapes-t2i"
FAST = ["progress=false", "cameras.batch_size=2", "cameras.eval_size=32", "turntable_frames=4", "val_every=0",
        "checkpoint_every=0", "log_every=1", "texture_size=32", "mesh_resolution=24", "gaussians.num_points=150",
        "render_sizes=[32]", "render_size_milestones=[]", "densify.densify_from=1", "densify.densify_every=2",
        "frames=4", "frame_views=1", "rigidity_points=64", "deformation.resolutions=[8]", "deformation.features=8",
        "deformation.hidden=16", "deformation.time_resolution=4"]


@pytest.fixture(scope="module")
def bounce_clip(tmp_path_factory):
    """The true clip of a bouncing red mug from the video-to-4d preset's input camera, as RGBA frames."""
    return save_clip(AnimatedObject(WorldObject("mug", "red"), "bounce"),
                     tmp_path_factory.mktemp("clip") / "mug_bounce", frames=6, size=48)


def make(preset, out, overrides):
    system_cls, cfg = load_run_config(preset, [f"output_dir={out}", *FAST, *overrides])
    run = new_run_dir(cfg.output_dir, system_cls.name, "test")
    write_config(run, cfg)
    return system_cls(cfg, run)


def text4d(out, steps=6, static=4, extra=()):
    return make("text-to-4d", out, ["prompt=a red mug", "motion=bouncing", f"max_steps={steps}",
                                    f"static_steps={static}", "turntable_frames=0", "exports=[]", *extra])


def test_static_stage_is_the_3d_recipe(tmp_path):
    """After static_steps, a dream4d run holds exactly the Gaussians of a dreamgaussian run of that many steps."""
    four_d = text4d(tmp_path / "a", steps=6, static=4)
    four_d.fit(stop_at=4)
    _, cfg = load_run_config("dreamgaussian", [f"output_dir={tmp_path / 'b'}", *[o for o in FAST if not o.startswith(
        ("frames", "frame_views", "rigidity", "deformation"))], "prompt=a red mug", "max_steps=4", "turntable_frames=0",
        "exports=[]", "densify.densify_until=0.7"])
    from gen3d.systems.dreamgaussian import DreamGaussian

    run = new_run_dir(cfg.output_dir, "dreamgaussian", "x")
    three_d = DreamGaussian(cfg, run)
    three_d.fit()
    a, b = four_d.model.state_dict(), three_d.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_dynamic_stage_trains_the_field_only(tmp_path):
    system = text4d(tmp_path, steps=7, static=4)
    system.fit(stop_at=4)
    gaussians = {k: v.clone() for k, v in system.model.state_dict().items()}
    field = {k: v.clone() for k, v in system.field.state_dict().items()}
    system.fit()
    assert all(torch.equal(gaussians[k], v) for k, v in system.model.state_dict().items())
    assert any(not torch.equal(field[k], v) for k, v in system.field.state_dict().items())
    rows = [json.loads(line) for line in (system.run_dir / "metrics.jsonl").read_text().splitlines()]
    dynamic = [r for r in rows if r["step"] > 4]
    assert dynamic and all({"video", "frame_sds", "smoothness", "rigidity"} <= set(r) for r in dynamic)
    # the frames now differ: the field moves the Gaussians differently at t = 0 and t = 1
    assert not torch.allclose(system.dynamic.at(0.0).means, system.dynamic.at(1.0).means)


@pytest.fixture(scope="module")
def rest_prior(tmp_path_factory):
    """A video prior that takes the object at rest (`train-video-prior rest_frame=true`), one step from shapes-t2v."""
    from gen3d.world.train_video_prior import VideoPriorTrainConfig, VideoPriorTrainer

    work = tmp_path_factory.mktemp("i2v")
    cfg = VideoPriorTrainConfig(output=str(work / "out"), work_dir=str(work / "work"), steps=1, max_objects=1,
                                clips_per_pair=1, frames=4, size=32, supersample=1, progress=False, rest_frame=True,
                                init_from="gen3d/shapes-t2v")
    return str(VideoPriorTrainer(cfg).fit())


@pytest.mark.parametrize("video_rest", [True, False])
def test_video_prior_is_shown_the_static_stage(tmp_path, rest_prior, video_rest):
    """A video prior that takes the object at rest is shown, at each video SDS step, the frozen static stage from the
    clip's camera on the clip's background (video_rest=false: no image)."""
    from gen3d.rendering.gaussian import render_gaussians

    system = text4d(tmp_path, steps=5, static=4, extra=[f"video_rest={str(video_rest).lower()}",
                                                        f"video_prior={rest_prior}"])
    system.fit(stop_at=4)
    assert system.video_prior.rest_frame
    seen = []
    at_rest = system.video_prior.at_rest
    system.video_prior.at_rest = lambda rest: seen.append(rest) or at_rest(rest)  # record, then the real one
    system.fit()
    assert len(seen) == 1
    if not video_rest:
        assert seen[0] is None
        return
    assert seen[0].shape == (1, 32, 32, 3)
    renders = [render_gaussians(system.model, system.last_cameras, torch.full((1, 3), bg)).rgb for bg in (0.0, 1.0)]
    assert any(torch.allclose(seen[0], r, atol=1e-5) for r in renders)
    assert not torch.allclose(renders[0], renders[1])  # the object is in view: the background is not all there is


@pytest.mark.parametrize("stop_at", [4, 6])  # at the stage boundary, and inside the dynamic stage
def test_resumed_run_matches_uninterrupted(tmp_path, stop_at):
    straight = text4d(tmp_path / "a", steps=8, static=4)
    straight.fit()
    first = text4d(tmp_path / "b", steps=8, static=4)
    first.fit(stop_at=stop_at)
    first.save()
    resumed = type(first)(first.cfg, first.run_dir)
    assert resumed.resume() == stop_at
    resumed.fit()
    a, b = straight.model_tensors(), resumed.model_tensors()
    assert a.keys() == b.keys() and any(k.startswith("field.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_text_to_4d_outputs_and_viewer_snapshot(tmp_path):
    """A whole run from the command line: PLY sequence, mesh sequence, animated turntable, front clip; `gen3d view`'s
    snapshot of the run has a timeline."""
    import trimesh

    from gen3d.export.ply import load_gaussian_ply
    from gen3d.viewer.snapshots import snapshot_of

    out = tmp_path / "outputs"
    assert main(["run", "text-to-4d", "prompt=a red mug", "motion=bouncing", f"output_dir={out}", *FAST,
                 "max_steps=5", "static_steps=3", "exports=[splat-ply,glb]", "val_every=5"]) == 0
    run = resolve_run("@last", out)
    frames = sorted((run / "export" / "frames").glob("frame_*.ply"))
    assert [p.name for p in frames] == [f"frame_{i:03d}.ply" for i in range(4)]
    system_cls, cfg = load_run_config(str(run), [])
    system = system_cls(cfg, run)
    system.resume(model_only=True)
    for path, t in zip(frames, system.times()):
        assert torch.allclose(load_gaussian_ply(path).means, system.dynamic.at(t).means, atol=1e-5)
    scene = trimesh.load(run / "export" / "mesh.glb")
    assert len(scene.geometry) == 4
    assert (run / "export" / "model.ply").is_file()
    assert (run / "video" / "turntable.mp4").stat().st_size > 0 and (run / "video" / "clip.mp4").stat().st_size > 0
    assert (run / "val" / "step-000005.png").is_file()
    snapshot, _, _ = snapshot_of(str(run))
    assert snapshot.timeline is not None and len(snapshot.timeline.times) == 4


def test_video_to_4d_fits_the_clip(tmp_path, bounce_clip):
    """The dynamic stage fits every frame of the input video: the reference loss falls and the Gaussians rise and
    fall with the mug."""
    system = make("video-to-4d", tmp_path, [f"video={bounce_clip}", "max_steps=40", "static_steps=20",
                                            "turntable_frames=0", "exports=[]", "image_size=48", "lambda_zero123=0.1",
                                            "deformation_lr=0.005", "grid_lr=0.05", "lambda_rigidity=0"])
    assert system.clip_rgb.shape == (4, 48, 48, 3)
    system.fit()
    rows = [json.loads(line) for line in (system.run_dir / "metrics.jsonl").read_text().splitlines()]
    dyn = [r["ref_rgb"] + r["ref_mask"] for r in rows if r["step"] > 20]
    assert min(dyn[-5:]) < dyn[0]
    heights = [system.dynamic.at(t).means[:, 2].mean().item() for t in system.times()]
    assert max(heights[1:3]) > heights[0] + 0.01 and max(heights[1:3]) > heights[-1] + 0.01  # up, then down
    assert (system.run_dir / "reference_clip.png").is_file()


def test_image_to_4d_runs_with_the_video_prior(tmp_path, bounce_clip):
    image = sorted(bounce_clip.glob("*.png"))[0]
    system = make("video-to-4d", tmp_path, [f"image={image}", "prompt=a red mug", "motion=bouncing", "lambda_video=1",
                                            "max_steps=4", "static_steps=2", "turntable_frames=0", "exports=[]"])
    system.fit()
    rows = [json.loads(line) for line in (system.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {"video", "frame_zero123", "ref_rgb"} <= set(rows[-1])


@pytest.mark.parametrize("preset, args, message", [
    ("text-to-4d", ["prompt=a red mug", "motion="], "motion is empty"),
    ("text-to-4d", ["prompt=a red mug", "static_steps=10", "max_steps=10"], "static_steps must be in [1, max_steps)"),
    ("text-to-4d", ["prompt=a red mug", "frames=1"], "frames must be in 2..64"),
    ("video-to-4d", [], "no input: pass video="),
    ("video-to-4d", ["video=a.mp4", "image=b.png"], "not both"),
    ("video-to-4d", ["image={png}"], "image-to-4D has no motion"),
    ("video-to-4d", ["image={png}", "lambda_video=1"], "needs prompt= and motion="),
    ("video-to-4d", ["video={missing}"], "does not exist"),
    ("video-to-4d", ["video={clip}", "frames=9"], "has 6 frame(s) but the run uses frames=9"),
])
def test_bad_input_is_one_clear_error(tmp_path, capsys, bounce_clip, preset, args, message):
    png = sorted(bounce_clip.glob("*.png"))[0]
    args = [a.format(png=png, clip=bounce_clip, missing=tmp_path / "nope.mp4") for a in args]
    out = tmp_path / "outputs"
    assert main(["run", preset, f"output_dir={out}", "progress=false", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not any(out.rglob("checkpoints"))


def test_world_clip_command(tmp_path, capsys):
    from gen3d.images import load_clip

    assert main(["world", "clip", "a green cone", "--motion", "grow", "--frames", "5", "--size", "32",
                 "--output", str(tmp_path / "cone.gif")]) == 0
    clip = load_clip(tmp_path / "cone.gif", 5, size=32)
    areas = [c.mask.sum().item() for c in clip]
    assert areas[-1] > areas[0] * 1.5  # the cone grows in the picture: one crop for the whole clip
    assert main(["world", "clip", "a green cone", "--motion", "jump", "--output", str(tmp_path / "x.gif")]) == 2
    assert "unknown motion 'jump'" in capsys.readouterr().err
