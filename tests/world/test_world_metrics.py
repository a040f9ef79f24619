"""3D metrics: CIEDE2000 against Sharma et al. 2005, IoU, silhouettes, colors, consistency, samples."""

import math

import numpy as np
import pytest
import torch

from gen3d.cameras import spherical_cameras
from gen3d.world import (
    ObjectQuery,
    WorldObject,
    border_background,
    ciede2000,
    color_error,
    eval_cameras,
    iou_3d,
    multiview_consistency,
    render_object,
    sample_agreement,
    silhouette_iou,
    srgb_to_lab,
)
from gen3d.world.render import render_sdf

# Sharma, Wu and Dalal 2005, Table 1: L1 a1 b1, L2 a2 b2, CIEDE2000 (all 34 pairs).
SHARMA_PAIRS = [
    (50.0000, 2.6772, -79.7751, 50.0000, 0.0000, -82.7485, 2.0425),
    (50.0000, 3.1571, -77.2803, 50.0000, 0.0000, -82.7485, 2.8615),
    (50.0000, 2.8361, -74.0200, 50.0000, 0.0000, -82.7485, 3.4412),
    (50.0000, -1.3802, -84.2814, 50.0000, 0.0000, -82.7485, 1.0000),
    (50.0000, -1.1848, -84.8006, 50.0000, 0.0000, -82.7485, 1.0000),
    (50.0000, -0.9009, -85.5211, 50.0000, 0.0000, -82.7485, 1.0000),
    (50.0000, 0.0000, 0.0000, 50.0000, -1.0000, 2.0000, 2.3669),
    (50.0000, -1.0000, 2.0000, 50.0000, 0.0000, 0.0000, 2.3669),
    (50.0000, 2.4900, -0.0010, 50.0000, -2.4900, 0.0009, 7.1792),
    (50.0000, 2.4900, -0.0010, 50.0000, -2.4900, 0.0010, 7.1792),
    (50.0000, 2.4900, -0.0010, 50.0000, -2.4900, 0.0011, 7.2195),
    (50.0000, 2.4900, -0.0010, 50.0000, -2.4900, 0.0012, 7.2195),
    (50.0000, -0.0010, 2.4900, 50.0000, 0.0009, -2.4900, 4.8045),
    (50.0000, -0.0010, 2.4900, 50.0000, 0.0010, -2.4900, 4.8045),
    (50.0000, -0.0010, 2.4900, 50.0000, 0.0011, -2.4900, 4.7461),
    (50.0000, 2.5000, 0.0000, 50.0000, 0.0000, -2.5000, 4.3065),
    (50.0000, 2.5000, 0.0000, 73.0000, 25.0000, -18.0000, 27.1492),
    (50.0000, 2.5000, 0.0000, 61.0000, -5.0000, 29.0000, 22.8977),
    (50.0000, 2.5000, 0.0000, 56.0000, -27.0000, -3.0000, 31.9030),
    (50.0000, 2.5000, 0.0000, 58.0000, 24.0000, 15.0000, 19.4535),
    (50.0000, 2.5000, 0.0000, 50.0000, 3.1736, 0.5854, 1.0000),
    (50.0000, 2.5000, 0.0000, 50.0000, 3.2972, 0.0000, 1.0000),
    (50.0000, 2.5000, 0.0000, 50.0000, 1.8634, 0.5757, 1.0000),
    (50.0000, 2.5000, 0.0000, 50.0000, 3.2592, 0.3350, 1.0000),
    (60.2574, -34.0099, 36.2677, 60.4626, -34.1751, 39.4387, 1.2644),
    (63.0109, -31.0961, -5.8663, 62.8187, -29.7946, -4.0864, 1.2630),
    (61.2901, 3.7196, -5.3901, 61.4292, 2.2480, -4.9620, 1.8731),
    (35.0831, -44.1164, 3.7933, 35.0232, -40.0716, 1.5901, 1.8645),
    (22.7233, 20.0904, -46.6940, 23.0331, 14.9730, -42.5619, 2.0373),
    (36.4612, 47.8580, 18.3852, 36.2715, 50.5065, 21.2231, 1.4146),
    (90.8027, -2.0831, 1.4410, 91.1528, -1.6435, 0.0447, 1.4441),
    (90.9257, -0.5406, -0.9208, 88.6381, -0.8985, -0.7239, 1.5381),
    (6.7747, -0.2908, -2.4247, 5.8714, -0.0985, -2.2286, 0.6377),
    (2.0776, 0.0795, -1.1350, 0.9033, -0.0636, -0.5514, 0.9082),
]


class SDFQuery:
    """A query from any SDF and albedo, e.g. a transformed world object."""

    def __init__(self, sdf, albedo=lambda p: torch.full_like(p, 0.5)):
        self.sdf, self.albedo = sdf, albedo

    def occupancy(self, points):
        return (self.sdf(points) <= 0).float()

    def render(self, cameras):
        return render_sdf(self.sdf, self.albedo, cameras, radius=1.2)


def _rotated(obj, degrees):
    """The object turned by `degrees` about z, as a query."""
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    R = torch.tensor([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    return SDFQuery(lambda p: obj.sdf(p @ R), lambda p: obj.color_at(p @ R))  # p @ R = R^T p


def test_ciede2000_matches_sharma_table_and_skimage():
    pairs = torch.tensor(SHARMA_PAIRS, dtype=torch.float64)
    ours = ciede2000(pairs[:, :3], pairs[:, 3:6])
    assert torch.allclose(ours, pairs[:, 6], atol=5e-5)  # the table is rounded to 4 decimals
    assert torch.allclose(ciede2000(pairs[:, 3:6], pairs[:, :3]), ours, atol=1e-10)  # symmetric
    skimage_color = pytest.importorskip("skimage.color")
    lab = torch.rand(500, 2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    lab = lab * torch.tensor([100.0, 200.0, 200.0], dtype=torch.float64) - torch.tensor([0.0, 100.0, 100.0],
                                                                                         dtype=torch.float64)
    reference = skimage_color.deltaE_ciede2000(lab[:, 0].numpy(), lab[:, 1].numpy())
    assert np.allclose(ciede2000(lab[:, 0], lab[:, 1]).numpy(), reference, atol=1e-8)
    rgb = torch.rand(500, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert np.allclose(srgb_to_lab(rgb).numpy(), skimage_color.rgb2lab(rgb.numpy()), atol=0.01)
    assert srgb_to_lab(torch.ones(3)).tolist() == pytest.approx([100.0, 0.0, 0.0], abs=1e-3)


def test_ground_truth_against_itself():
    obj = WorldObject("mug", "red")
    gt = ObjectQuery(obj)
    cams = eval_cameras(32)
    assert iou_3d(gt, obj, resolution=48) == 1.0
    assert iou_3d(gt, obj, resolution=48, normalize=False) == 1.0
    assert silhouette_iou(gt, obj, cams) == 1.0
    assert color_error(gt, obj, cams) == pytest.approx(0.0, abs=1e-9)


def test_iou_of_concentric_spheres_is_the_volume_ratio():
    obj = WorldObject("sphere", "red")  # radius 0.5
    bigger = SDFQuery(lambda p: p.norm(dim=-1) - 0.55)
    assert iou_3d(bigger, obj, resolution=64, normalize=False) == pytest.approx((0.5 / 0.55) ** 3, abs=0.01)
    assert iou_3d(bigger, obj, resolution=64, normalize=True) > 0.97  # same shape once scaled


def test_solid_iou_fills_what_a_surface_encloses():
    """A hollow shell (what 3D Gaussians often leave behind an opaque surface) scores as the solid it
    encloses; solid=False scores its raw occupancy. An open cavity (the mug's) stays empty."""
    obj = WorldObject("sphere", "red")  # radius 0.5
    shell = SDFQuery(lambda p: (p.norm(dim=-1) - 0.45).abs() - 0.05)  # 0.4 < r < 0.5
    assert iou_3d(shell, obj, resolution=64, normalize=False) > 0.97
    assert iou_3d(shell, obj, resolution=64, normalize=False, solid=False) < 0.6
    mug = WorldObject("mug", "red")
    assert iou_3d(ObjectQuery(mug), mug, resolution=48) == 1.0
    filled_mug = SDFQuery(WorldObject("cylinder", "red").sdf)
    assert iou_3d(filled_mug, mug, resolution=48) < 0.8


def test_normalization_forgives_position_and_scale():
    obj = WorldObject("mug", "red")
    shift, scale = torch.tensor([0.15, -0.1, 0.05]), 0.7
    moved = SDFQuery(lambda p: obj.sdf((p - shift) / scale) * scale)
    assert iou_3d(moved, obj, resolution=64, normalize=False) < 0.5
    assert iou_3d(moved, obj, resolution=64, normalize=True) > 0.95
    assert iou_3d(SDFQuery(WorldObject("cylinder", "red").sdf), obj, resolution=64) < 0.7  # but not shape


def test_best_over_azimuth_fixes_a_turned_shape():
    cube = WorldObject("cube", "red")
    turned = _rotated(cube, 30.0)
    assert iou_3d(turned, cube, resolution=40, best_over_azimuth=False) < 0.9
    assert iou_3d(turned, cube, resolution=40) > 0.97  # symmetric shapes: best over azimuth by default
    chair = WorldObject("chair", "red")
    backwards = _rotated(chair, 180.0)
    assert iou_3d(backwards, chair, resolution=40) < 0.8  # a front matters by default
    assert iou_3d(backwards, chair, resolution=40, best_over_azimuth=True) > 0.97
    cams = eval_cameras(24, azimuths=4, elevations=(20.0,))
    assert silhouette_iou(turned, cube, cams, best_over_azimuth=False) < 0.95
    assert silhouette_iou(turned, cube, cams) > 0.97


def test_color_error_sees_a_wrong_color():
    cams = eval_cameras(24, azimuths=4)
    red, orange = WorldObject("capsule", "red"), WorldObject("capsule", "orange")
    err = color_error(ObjectQuery(orange), red, cams)
    assert err > 10
    assert silhouette_iou(ObjectQuery(orange), red, cams) == 1.0


def test_multiview_consistency():
    obj = WorldObject("house", "yellow")
    gt = multiview_consistency(ObjectQuery(obj))
    assert gt.delta_e < 2.0 and gt.matched_fraction > 0.8

    class ViewDependent(ObjectQuery):
        def render(self, cameras):  # tint each view by its azimuth, as view-dependent color would
            out = super().render(cameras)
            a = torch.deg2rad(4 * cameras.azimuth)
            tint = torch.stack([torch.cos(a), torch.zeros(len(cameras)), torch.sin(a)], -1)
            out.rgb = (out.rgb + 0.25 * tint[:, None, None] * out.alpha).clamp(0, 1)
            return out

    bad = multiview_consistency(ViewDependent(obj))
    assert bad.delta_e > 3 * gt.delta_e + 3


def test_sample_agreement():
    obj = WorldObject("snowman", "pink")
    cams = spherical_cameras(torch.tensor([30.0, -90.0]), torch.tensor([20.0, 0.0]), torch.tensor([2.5, 3.0]),
                             torch.tensor([45.0, 45.0]), 32, 32)  # two of the reference views
    samples = render_object(obj, cams).rgb  # [2, 32, 32, 3]
    wrong = render_object(WorldObject("snowman", "green"), cams).rgb[:1]
    blank = torch.ones(1, 32, 32, 3)
    prompts = ["a rosy snowman", "a pink snowman, side view", "a pink snowman", "a pink snowman", "a teapot"]
    scores = sample_agreement(torch.cat([samples, wrong, blank, blank]), prompts)
    assert [s.object for s in scores] == [obj] * 4 + [None]
    assert scores[0].silhouette_iou == pytest.approx(1.0) and scores[1].silhouette_iou == pytest.approx(1.0)
    assert scores[0].color_delta_e < 0.5 and scores[1].color_delta_e < 0.5
    assert scores[2].color_delta_e > 20
    assert math.isnan(scores[3].color_delta_e) and scores[3].silhouette_iou == 0.0
    assert math.isnan(scores[4].color_delta_e)
    with pytest.raises(ValueError, match="N, H, W, 3"):
        sample_agreement(samples, prompts)


def test_sample_agreement_finds_each_images_background():
    """A prior trained on white and black backgrounds: each sample is judged against its own border color."""
    obj = WorldObject("mug", "orange")
    cams = spherical_cameras(torch.tensor([30.0]), torch.tensor([20.0]), torch.tensor([2.5]), torch.tensor([45.0]), 32, 32)
    on_white = render_object(obj, cams, background=(1.0, 1.0, 1.0)).rgb
    on_black = render_object(obj, cams, background=(0.0, 0.0, 0.0)).rgb
    both = torch.cat([on_white, on_black])
    assert torch.allclose(border_background(both), torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]))
    auto = sample_agreement(both, ["an orange mug"] * 2)
    assert auto[0].silhouette_iou == pytest.approx(1.0) and auto[1].silhouette_iou > 0.95
    assert auto[1].color_delta_e < 3
    fixed = sample_agreement(both, ["an orange mug"] * 2, background=(1.0, 1.0, 1.0))
    assert fixed[1].silhouette_iou < 0.5  # a black background read as foreground
    with pytest.raises(ValueError, match="border"):
        sample_agreement(both, ["an orange mug"] * 2, background="auto")
