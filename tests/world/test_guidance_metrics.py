"""Metrics of score distillation's failure modes: multi-face (Janus), seed diversity, over-saturation."""

import math

import pytest
import torch

from gen3d.world import ObjectQuery, WorldObject, eval_cameras
from gen3d.world.catalog import SHAPES
from gen3d.world.metrics import multi_face, rotate_cameras, saturation, seed_diversity
from tests.world.test_world_metrics import SDFQuery, _rotated

FRONTED = sorted(name for name, shape in SHAPES.items() if shape.has_front)  # mug, house, chair, snowman, rocket
SIZE = 48


def _two_faced(obj):
    """The object with its front half mirrored onto its back (x -> |x|): a 3D object with a front on both sides."""
    def fold(p):
        return torch.cat([p[:, :1].abs(), p[:, 1:]], 1)

    return SDFQuery(lambda p: obj.sdf(fold(p)), lambda p: obj.color_at(fold(p)))


class FrontEverywhere(ObjectQuery):
    """The ground truth, except that every camera behind it (cos azimuth < 0) sees the front view:
    what a prior that ignores the view in its prompt paints on the back."""

    def render(self, cameras):
        out = super().render(cameras)
        back = torch.cos(torch.deg2rad(cameras.azimuth)) < 0
        if back.any():
            front = super().render(rotate_cameras(cameras[back], 180.0))
            out.rgb[back], out.alpha[back], out.depth[back] = front.rgb, front.alpha, front.depth
        return out


class Moved:
    """A query moved by `shift` and scaled by `scale` about the origin."""

    def __init__(self, query, shift, scale):
        self.query, self.shift, self.scale = query, torch.tensor(shift), scale

    def occupancy(self, points):
        return self.query.occupancy((points - self.shift) / self.scale)

    def render(self, cameras):
        q = self.query
        return SDFQuery(lambda p: q.sdf((p - self.shift) / self.scale) * self.scale,
                        lambda p: q.albedo((p - self.shift) / self.scale)).render(cameras)


@pytest.mark.parametrize("shape", FRONTED)
def test_multi_face_on_ground_truth_turned_and_two_faced(shape):
    obj = WorldObject(shape, "yellow")
    gt = multi_face(ObjectQuery(obj), obj, size=SIZE)
    assert gt.front_ok and not gt.back_like_front and not gt.is_multi_face
    assert gt.front_to_front == pytest.approx(0.0, abs=1e-3) and gt.back_to_back == pytest.approx(0.0, abs=1e-3)

    turned = multi_face(_rotated(obj, 180.0), obj, size=SIZE)  # facing backwards: a wrong heading, not a Janus
    assert not turned.front_ok and not turned.is_multi_face

    painted = multi_face(FrontEverywhere(obj), obj, size=SIZE)
    assert painted.is_multi_face and painted.back_like_front

    if shape in ("house", "snowman", "rocket"):  # the mug is its own mirror image; a folded chair is a stool
        folded = multi_face(_two_faced(obj), obj, size=SIZE)
        assert folded.is_multi_face, folded


def test_multi_face_mug_tells_the_handle_side():
    """A mug's back view is its front mirrored: a mug showing the handle on the right from behind too is two-faced."""
    mug = WorldObject("mug", "red")
    mirrored = SDFQuery(lambda p: mug.sdf(p * p.new_tensor([1.0, -1.0, 1.0])), mug.color_at)  # handle on -y
    result = multi_face(mirrored, mug, size=SIZE)
    assert not result.front_ok and result.back_like_front


def test_multi_face_normalizes_position_and_size():
    house = WorldObject("house", "pink")
    moved = Moved(SDFQuery(house.sdf, house.color_at), (0.05, -0.04, 0.06), 0.8)
    result = multi_face(moved, house)
    assert result.front_ok and not result.back_like_front
    assert multi_face(Moved(_two_faced(house), (0.05, -0.04, 0.06), 0.8), house).is_multi_face


def test_multi_face_needs_a_front():
    with pytest.raises(ValueError, match="has_front"):
        multi_face(ObjectQuery(WorldObject("cube", "red")), WorldObject("cube", "red"), size=SIZE)


def test_seed_diversity():
    mug, cube = WorldObject("mug", "red"), WorldObject("cube", "blue")
    assert seed_diversity([ObjectQuery(mug)] * 3) == pytest.approx(0.0, abs=1e-6)
    moved = Moved(SDFQuery(mug.sdf, mug.color_at), (0.1, 0.0, -0.05), 0.8)
    assert seed_diversity([ObjectQuery(mug), moved]) < 0.05  # position and size do not count
    assert seed_diversity([ObjectQuery(mug), ObjectQuery(cube)]) > 0.4
    turned = _rotated(cube, 30.0)
    assert seed_diversity([ObjectQuery(cube), turned]) > 0.15
    assert seed_diversity([ObjectQuery(cube), turned], best_over_azimuth=True) < 0.02
    with pytest.raises(ValueError, match="at least 2"):
        seed_diversity([ObjectQuery(mug)])


def test_saturation():
    cameras = eval_cameras(32, azimuths=4)
    gray, red = WorldObject("capsule", "gray"), WorldObject("capsule", "red")
    assert saturation(ObjectQuery(gray), cameras) < 1.0
    assert saturation(ObjectQuery(red), cameras) > 40.0

    class Boosted(ObjectQuery):  # colors pushed away from their gray, as high guidance scales do
        def render(self, cameras):
            out = super().render(cameras)
            mean = out.rgb.mean(-1, keepdim=True)
            out.rgb = (mean + 1.5 * (out.rgb - mean)).clamp(0, 1)
            return out

    pink = WorldObject("capsule", "pink")
    assert saturation(Boosted(pink), cameras) > 1.2 * saturation(ObjectQuery(pink), cameras)
    empty = SDFQuery(lambda p: p.norm(dim=-1) + 1.0)  # nothing inside
    assert math.isnan(saturation(empty, cameras))
