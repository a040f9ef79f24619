"""4D scores against known motion: zero for the truth, the motion's size for a frozen result."""

import torch

from gen3d.cameras import spherical_cameras
from gen3d.representations.dynamic import GaussianFrame
from gen3d.world.animation import AnimatedObject
from gen3d.world.catalog import WorldObject
from gen3d.world.motion_metrics import flicker, motion_error

BOUNCE = AnimatedObject(WorldObject("cube", "red"), "bounce")
TIMES = [0.0, 0.25, 0.5, 0.75, 1.0]


class Moved:
    """A stand-in 4D result whose Gaussians follow `motion` exactly (None: frozen at t = 0)."""

    def __init__(self, motion, opacity_logits):
        self.points = torch.rand(100, 3, generator=torch.Generator().manual_seed(0)) - 0.5
        self.motion, self.logits = motion, opacity_logits

    def at(self, t):
        means = self.points if self.motion is None else self.motion.move(self.points, t)
        return GaussianFrame(means, torch.zeros(100, 4), torch.zeros(100, 3), self.logits, torch.zeros(100, 1, 3))


class Mixed(Moved):
    """The first 10 Gaussians follow the motion, the rest stay where they start."""

    def at(self, t):
        frame = super().at(t)
        frame.means = torch.cat([frame.means[:10], self.points[10:]])
        return frame


def test_motion_error_is_zero_for_the_truth_and_the_displacement_for_a_frozen_result():
    opaque = torch.full((100,), 5.0)
    assert motion_error(Moved(BOUNCE, opaque), BOUNCE, TIMES) < 1e-6
    frozen = motion_error(Moved(None, opaque), BOUNCE, TIMES)
    # the bounce's mean height over the five times: 0.25 * 4 t (1 - t)
    want = sum(0.25 * 4 * t * (1 - t) for t in TIMES) / len(TIMES)
    assert abs(frozen - want) < 1e-5
    # only opaque Gaussians count: the first 10 follow the truth, the faint rest stay frozen
    logits = torch.full((100,), -5.0)
    logits[:10] = 5.0
    mixed = Mixed(BOUNCE, logits)
    assert motion_error(mixed, BOUNCE, TIMES) < 1e-6
    assert abs(motion_error(mixed, BOUNCE, TIMES, min_opacity=0.0) - 0.9 * want) < 1e-5


def test_flicker_is_zero_for_the_truth_and_positive_for_a_frozen_or_noisy_result():
    cams = spherical_cameras(torch.tensor([0.0]), torch.tensor([10.0]), torch.tensor([3.2]), torch.tensor([45.0]),
                             24, 24)
    truth = lambda t: BOUNCE.render(cams, t).rgb  # noqa: E731
    assert flicker(truth, BOUNCE, cams, TIMES) == 0
    frozen = flicker(lambda t: truth(0.0), BOUNCE, cams, TIMES)
    assert frozen > 0.005
    g = torch.Generator().manual_seed(0)
    noisy = flicker(lambda t: truth(t) + 0.05 * torch.randn(truth(t).shape, generator=g), BOUNCE, cams, TIMES)
    assert noisy > 0.02
