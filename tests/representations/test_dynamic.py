"""Dynamic Gaussians: frames render like Gaussians, train both parts, and export as a PLY sequence."""

import pytest
import torch
from plyfile import PlyData

from gen3d.cameras import spherical_cameras
from gen3d.rendering.gaussian import render_gaussians
from gen3d.representations.deformation import DeformationConfig, DeformationField
from gen3d.representations.dynamic import DynamicGaussians, save_ply_sequence
from gen3d.representations.gaussians import GaussianConfig, GaussianModel


def scene(seed=0):
    torch.manual_seed(seed)
    g = GaussianModel.random_ball(GaussianConfig(num_points=200, init_radius=0.4, sh_degree=1),
                                  generator=torch.Generator().manual_seed(seed))
    return DynamicGaussians(g, DeformationField(DeformationConfig(resolutions=[8], time_resolution=4, features=4,
                                                                  hidden=16)))


def camera(size=24):
    one = lambda v: torch.tensor([float(v)])  # noqa: E731
    return spherical_cameras(one(20), one(15), one(2.5), one(45), size, size)


def test_a_new_dynamic_scene_renders_as_its_canonical_gaussians_at_every_time():
    dyn, cam, white = scene(), camera(), torch.ones(1, 3)
    want = render_gaussians(dyn.gaussians, cam, white, backend="torch").rgb
    for t in (0.0, 0.5, 1.0):
        frame = dyn.at(t)
        assert frame.sh_degree == 1 and frame.num_gaussians == 200
        assert torch.allclose(render_gaussians(frame, cam, white, backend="torch").rgb, want, atol=1e-6)


def test_losses_on_two_frames_train_a_motion_that_depends_on_time():
    """Frame 0 must stay the canonical render and frame 1 must be it shifted: the field learns a t-dependent motion,
    and the gradient reaches the field and the Gaussians."""
    dyn, cam, white = scene(), camera(), torch.ones(1, 3)
    with torch.no_grad():
        still = render_gaussians(dyn.gaussians, cam, white, backend="torch").rgb
    targets = {0.0: still, 1.0: still.roll(3, dims=2)}  # shifted right by 3 pixels at t = 1
    opt = torch.optim.Adam([{"params": dyn.field.parameters(), "lr": 1e-2},
                            {"params": [dyn.gaussians.means], "lr": 1e-3}])

    def loss_at(t):
        return (render_gaussians(dyn.at(t), cam, white, backend="torch").rgb - targets[t]).square().mean()

    start = loss_at(1.0).item()
    for step in range(80):
        loss = loss_at(float(step % 2))
        opt.zero_grad()
        loss.backward()
        assert dyn.gaussians.means.grad is not None and dyn.field.heads["means"].weight.grad is not None
        opt.step()
    assert loss_at(1.0).item() < 0.6 * start and loss_at(0.0).item() < 0.3 * start
    with torch.no_grad():
        moved = (dyn.at(1.0).means - dyn.at(0.0).means).norm(dim=-1).mean()
    assert moved > 0.01


def test_ply_sequence(tmp_path):
    dyn = scene()
    with torch.no_grad():
        dyn.field.heads["means"].bias.copy_(torch.tensor([0.1, 0.0, 0.0]))
        dyn.field.temporal[0][0, :, 2:] = 0.0  # the motion vanishes for t > 1/2 (features go to zero)
    paths = save_ply_sequence(dyn, tmp_path / "frames", 3)
    assert [p.name for p in paths] == ["frame_000.ply", "frame_001.ply", "frame_002.ply"]
    xs = [torch.tensor(PlyData.read(str(p))["vertex"]["x"]) for p in paths]
    assert all(len(x) == 200 for x in xs)
    canonical = dyn.gaussians.means[:, 0].detach()
    assert torch.allclose(xs[0], canonical + 0.1, atol=1e-5)
    with pytest.raises(ValueError, match="frames must be"):
        save_ply_sequence(dyn, tmp_path / "none", 0)
