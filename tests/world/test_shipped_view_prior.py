"""The shipped view-conditioned prior: present, self-describing, loaded by id, and it follows its input view
and the camera: its azimuth and its distance."""

import json

import torch

from gen3d.priors.sampling import sample_novel_views
from gen3d.priors.view_conditioning import EMBEDDED_VIEW_PRIORS, ViewConditionedPrior, relative_pose
from gen3d.world.catalog import HELD_OUT, WorldObject
from gen3d.world.train_view_prior import SAMPLE_CAMERA, render_on_white


def test_shipped_view_prior_is_small_and_describes_itself():
    folder = EMBEDDED_VIEW_PRIORS["gen3d/shapes-zero123"]
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert size < 10 * 2**20, size
    card = json.loads((folder / "gen3d_prior.json").read_text())
    assert [tuple(h) for h in card["held_out"]] == [tuple(h) for h in HELD_OUT]
    assert card["steps"] == card["config"]["steps"]
    assert not list(folder.rglob("*.bin")), "weights are safetensors"


def test_novel_views_carry_the_input_object():
    """Novel views drawn from an object's own input view match the ground truth of the turned view
    better than novel views, of the same seeds and pose, drawn from another object's input view.

    (The camera's effect is tested separately below.)"""
    prior = ViewConditionedPrior.from_pretrained("gen3d/shapes-zero123")
    assert prior.resolution == 32
    cam = SAMPLE_CAMERA
    objects = [WorldObject("house", "pink"), WorldObject("rocket", "blue"), WorldObject("mug", "red")]
    azimuth = torch.tensor([cam["azimuth"], cam["azimuth"] + 90.0])
    full = lambda v: torch.full((2,), float(v))  # noqa: E731
    views = [render_on_white(o, azimuth, full(cam["elevation"]), full(cam["distance"]), full(cam["fovy"]), 32, 2)
             .permute(0, 2, 3, 1) for o in objects]  # per object: input view, the view turned by 90 degrees
    pose = relative_pose(cam["elevation"], cam["azimuth"], cam["distance"], cam["elevation"],
                         torch.full((1,), cam["azimuth"] + 90.0), cam["distance"])
    errors = {"own": 0.0, "other": 0.0}
    for k, own in enumerate(views):
        other = views[(k + 1) % len(views)]
        for name, source in (("own", own), ("other", other)):
            novel = sample_novel_views(prior, source[:1], pose, steps=10, generator=torch.Generator().manual_seed(0))
            errors[name] += float((novel - own[1:]).pow(2).mean())
    assert errors["own"] < 0.5 * errors["other"], errors


@torch.no_grad()
def test_denoising_follows_the_camera_distance():
    """Targets rendered 0.2 closer and 0.2 farther than the input: the prior denoises each better with its
    own relative pose than with the other's (the size of the object follows the pose's distance)."""
    prior = ViewConditionedPrior.from_pretrained("gen3d/shapes-zero123")
    cam = SAMPLE_CAMERA
    three = lambda v: torch.full((3,), float(v))  # noqa: E731
    distance = torch.tensor([0.0, -0.2, 0.2]) + cam["distance"]
    g = torch.Generator().manual_seed(0)
    errors = {"right": 0.0, "wrong": 0.0}
    for obj in (WorldObject("house", "pink"), WorldObject("cube", "orange"), WorldObject("snowman", "yellow")):
        views = render_on_white(obj, three(cam["azimuth"]), three(cam["elevation"]), distance, three(cam["fovy"]), 32, 2)
        views = views.permute(0, 2, 3, 1)  # [3, h, w, 3]: input, closer, farther
        right = relative_pose(cam["elevation"], cam["azimuth"], distance[0], cam["elevation"], cam["azimuth"], distance[1:])
        x0 = prior.encode(views[1:])
        for step in (100, 300, 500):
            t = torch.full((2,), step, dtype=torch.long)
            eps = torch.randn(x0.shape, generator=g)
            for name, pose in (("right", right), ("wrong", right.flip(0))):
                cond = prior.encode_condition(views[:1].expand(2, -1, -1, -1), pose)
                pred = prior.predict_noise(prior.add_noise(x0, eps, t), t, cond, guidance_scale=1.0).eps_cond
                errors[name] += float((pred - eps).pow(2).mean())
    assert errors["right"] < 0.97 * errors["wrong"], errors


@torch.no_grad()
def test_denoising_follows_the_camera_azimuth():
    """From an object's front view, the views turned by 90, 180 and 270 degrees: the prior denoises them
    better with their own relative pose than with the pose turned another 180 degrees."""
    prior = ViewConditionedPrior.from_pretrained("gen3d/shapes-zero123")
    cam = SAMPLE_CAMERA
    four = lambda v: torch.full((4,), float(v))  # noqa: E731
    azimuth = torch.tensor([0.0, 90.0, 180.0, 270.0]) + cam["azimuth"]
    g = torch.Generator().manual_seed(0)
    errors = {"right": 0.0, "wrong": 0.0}
    for obj in (WorldObject("house", "pink"), WorldObject("snowman", "yellow"), WorldObject("rocket", "blue")):
        views = render_on_white(obj, azimuth, four(cam["elevation"]), four(cam["distance"]), four(cam["fovy"]), 32, 2)
        views = views.permute(0, 2, 3, 1)  # [4, h, w, 3]: the front (input), then the turned views
        poses = {turn: relative_pose(cam["elevation"], cam["azimuth"], cam["distance"], cam["elevation"],
                                     azimuth[1:] + turn, cam["distance"]) for turn in (0.0, 180.0)}
        x0 = prior.encode(views[1:])
        for step in (100, 300, 500):
            t = torch.full((3,), step, dtype=torch.long)
            eps = torch.randn(x0.shape, generator=g)
            for name, turn in (("right", 0.0), ("wrong", 180.0)):
                cond = prior.encode_condition(views[:1].expand(3, -1, -1, -1), poses[turn])
                pred = prior.predict_noise(prior.add_noise(x0, eps, t), t, cond, guidance_scale=1.0).eps_cond
                errors[name] += float((pred - eps).pow(2).mean())
    assert errors["right"] < 0.98 * errors["wrong"], errors
