"""Animated Shapes-world objects: exact motion, exact SDF at every time, renders that move."""

import math

import pytest
import torch

from gen3d.cameras import spherical_cameras
from gen3d.world.animation import MOTIONS, AnimatedObject
from gen3d.world.catalog import WorldObject

MUG = WorldObject("mug", "red")


def cloud(n=200, seed=0):
    return torch.rand(n, 3, generator=torch.Generator().manual_seed(seed)) * 1.4 - 0.7


@pytest.mark.parametrize("motion", sorted(MOTIONS))
def test_the_sdf_moves_with_the_points(motion):
    a, p = AnimatedObject(MUG, motion), cloud()
    for t in (0.0, 0.3, 0.5, 0.9):
        _, _, s = a.transform(t)
        moved = a.move(p, t)
        assert torch.allclose(a.to_canonical(moved, t), p, atol=1e-5)
        assert torch.allclose(a.sdf(moved, t), s * MUG.sdf(p), atol=1e-5)  # inside stays inside, surface on surface
        assert torch.equal(a.color_at(moved, t), MUG.color_at(a.to_canonical(moved, t)))


@pytest.mark.parametrize("motion", sorted(MOTIONS))
def test_rigid_motions_keep_distances_and_growth_scales_them(motion):
    a, p = AnimatedObject(MUG, motion), cloud(50)
    dist = lambda x: (x[:, None] - x[None]).norm(dim=-1)  # noqa: E731  (exact, unlike cdist's matmul form)
    d0 = dist(p)
    for t in (0.25, 0.6):
        d = dist(a.move(p, t))
        _, _, s = a.transform(t)
        assert torch.allclose(d, s * d0, atol=1e-5)
        assert (s == 1.0) == (motion != "grow")


def test_each_motion_at_its_rest_and_extremes():
    p = cloud(20)
    for motion in ("spin", "bounce", "swing"):
        assert torch.allclose(AnimatedObject(MUG, motion).move(p, 0.0), p, atol=1e-6), motion
    assert torch.allclose(AnimatedObject(MUG, "grow").move(p, 1.0), p)
    assert torch.allclose(AnimatedObject(MUG, "grow").move(p, 0.0), 0.6 * p)
    assert torch.allclose(AnimatedObject(MUG, "spin").move(p, 1.0), p, atol=1e-5)  # one full turn
    top = AnimatedObject(MUG, "bounce").move(p, 0.5) - p
    assert torch.allclose(top, torch.tensor([0.0, 0.0, 0.25]).expand_as(p))
    swing = AnimatedObject(MUG, "swing")
    pivot = torch.tensor([[0.0, 0.0, 0.75]])
    assert torch.allclose(swing.move(pivot, 0.25), pivot, atol=1e-6)  # the pivot stays put
    bottom = swing.move(torch.zeros(1, 3), 0.25)[0]
    assert bottom[0].item() == pytest.approx(-0.75 * math.sin(math.radians(20)), abs=1e-5)  # swung to -x


def test_frames_move_and_stay_in_view():
    cams = spherical_cameras(torch.tensor([30.0]), torch.tensor([15.0]), torch.tensor([3.2]), torch.tensor([45.0]),
                             32, 32)
    for motion in sorted(MOTIONS):
        a = AnimatedObject(MUG, motion)
        clip = a.frames(cams, 5)  # t = 0, 0.25, 0.5, 0.75, 1
        assert clip.shape == (5, 1, 32, 32, 3)
        assert (clip[1] - clip[0]).abs().max() > 0.2, motion  # a quarter of the clip: every motion has moved
        for t in (0.0, 0.25, 0.5, 1.0):
            alpha = a.render(cams, t).alpha[0, ..., 0]
            assert alpha.sum() > 20, (motion, t)
            assert alpha[0].sum() + alpha[-1].sum() + alpha[:, 0].sum() + alpha[:, -1].sum() == 0, (motion, t)
    assert AnimatedObject(MUG, "bounce").caption() == "a red mug, bouncing"


def test_bad_motion():
    with pytest.raises(ValueError, match="unknown motion 'jump'"):
        AnimatedObject(MUG, "jump")
    with pytest.raises(ValueError, match="finite"):
        AnimatedObject(MUG, "spin", float("nan"))
