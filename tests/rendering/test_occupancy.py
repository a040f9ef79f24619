"""Occupancy grid: which cells a ball's updates mark, the threshold and decay rules, warm-up and partial
updates, checkpoint state, sampling that drops empty cells before the field runs, early stopping,
input checks, and the nerfacc backend on CUDA."""

import math

import pytest
import torch

from gen3d.ops.volume import composite, ray_box, uniform_samples
from gen3d.rendering.occupancy import OccupancyGrid
from gen3d.representations.fields import Field, FieldOutput


class Ball(Field):
    """Constant density `sigma` inside the ball of `radius` around `center`; counts density evaluations."""

    def __init__(self, radius=0.4, sigma=20.0, center=(0.0, 0.0, 0.0)):
        super().__init__()
        self.radius, self.sigma, self.center = radius, sigma, torch.tensor(center)
        self.evaluations = 0

    def forward(self, points):
        self.evaluations += points.shape[0]
        inside = (points - self.center.to(points)).norm(dim=-1) < self.radius
        return FieldOutput(self.sigma * inside.to(points.dtype), torch.ones_like(points) * 0.5)


def _cell_centers(grid: OccupancyGrid) -> torch.Tensor:  # [R, R, R, 3]
    c = (torch.arange(grid.resolution) + 0.5) * grid.cell_size - grid.bound
    return torch.stack(torch.meshgrid(c, c, c, indexing="ij"), -1)


def _warm(grid, field, updates=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    for k in range(updates):
        assert grid.update(field.density, k * grid.update_interval, g)


def test_fresh_grid_is_fully_occupied():
    grid = OccupancyGrid(resolution=8)
    assert grid.occupied.all() and grid.occupied_fraction() == 1.0


def test_updates_mark_the_ball_and_not_far_cells():
    grid, ball = OccupancyGrid(resolution=16), Ball(radius=0.4, center=(0.3, -0.2, 0.1))
    _warm(grid, ball)
    dist = (_cell_centers(grid) - ball.center).norm(dim=-1)
    half_diag = grid.cell_size * math.sqrt(3) / 2
    assert grid.occupied[dist < ball.radius - half_diag].all()  # cells wholly inside
    assert not grid.occupied[dist > ball.radius + half_diag].any()  # cells wholly outside
    assert grid.updates.item() == 6


class Balls(Field):
    """Several constant-density balls: (center, radius, sigma) each."""

    def __init__(self, *balls):
        super().__init__()
        self.balls = balls

    def forward(self, points):
        sigma = torch.zeros(points.shape[0], dtype=points.dtype)
        for center, radius, s in self.balls:
            sigma = sigma + s * ((points - torch.tensor(center, dtype=points.dtype)).norm(dim=-1) < radius)
        return FieldOutput(sigma, torch.ones_like(points) * 0.5)


def _ball_cells(grid, center, radius):
    dist = (_cell_centers(grid) - torch.tensor(center)).norm(dim=-1)
    return grid.occupied[dist < radius - grid.cell_size].all(), grid.occupied[dist < radius + grid.cell_size].any()


def test_threshold_is_min_of_threshold_and_mean():
    grid = OccupancyGrid(resolution=16, step_size=0.01, threshold=0.01)
    # strong ball: tau = 1 (mean over cells ~0.06 > 0.01); medium: tau = 0.02 > 0.01; faint: tau = 0.005 < 0.01
    _warm(grid, Balls(((-0.5, 0.0, 0.0), 0.4, 100.0), ((0.5, 0.5, 0.0), 0.3, 2.0), ((0.5, -0.5, 0.0), 0.3, 0.5)))
    assert _ball_cells(grid, (-0.5, 0.0, 0.0), 0.4)[0]
    assert _ball_cells(grid, (0.5, 0.5, 0.0), 0.3)[0]
    assert not _ball_cells(grid, (0.5, -0.5, 0.0), 0.3)[1]
    # alone, the faint ball is kept: the mean over cells (~1e-4) is below its tau
    grid = OccupancyGrid(resolution=16, step_size=0.01, threshold=0.01)
    _warm(grid, Balls(((0.5, -0.5, 0.0), 0.3, 0.5)))
    assert _ball_cells(grid, (0.5, -0.5, 0.0), 0.3)[0]
    assert grid.occupied_fraction() < 0.1


def test_decay_releases_cells_the_field_left():
    grid = OccupancyGrid(resolution=16, ema_decay=0.5, warmup_steps=10 ** 6)
    _warm(grid, Ball(radius=0.3, center=(-0.5, 0.0, 0.0)), updates=3)
    old = grid.occupied[2:6, 6:10, 6:10].clone()  # around x = -0.5
    assert old.any()
    _warm(grid, Ball(radius=0.3, center=(0.5, 0.0, 0.0)), updates=8, seed=1)  # 20 * 0.5^8 * step < 0.01
    assert not grid.occupied[2:6, 6:10, 6:10].any()
    assert grid.occupied[10:14, 6:10, 6:10].any()


def test_update_interval_warmup_and_partial_updates():
    grid, ball = OccupancyGrid(resolution=8, update_interval=4, warmup_steps=8), Ball()
    g = torch.Generator().manual_seed(0)
    assert grid.update(ball.density, 3, g) and ball.evaluations == 8 ** 3  # a fresh grid updates at once (all cells)
    ball.evaluations = 0
    assert not grid.update(ball.density, 5, g) and ball.evaluations == 0  # then every update_interval steps
    assert grid.update(ball.density, 4, g) and ball.evaluations == 8 ** 3  # warm-up: every cell
    ball.evaluations = 0
    assert grid.update(ball.density, 8, g)
    n_occupied = int(grid.occupied.sum())
    assert 0 < n_occupied and ball.evaluations == 2 * (8 ** 3 // 4)  # a quarter uniform + a quarter occupied


def test_state_dict_round_trip():
    grid = OccupancyGrid(resolution=8)
    _warm(grid, Ball(), updates=2)
    state = grid.state_dict()
    assert set(state) == {"density", "occupied", "updates"}
    other = OccupancyGrid(resolution=8)
    other.load_state_dict(state)
    assert torch.equal(other.occupied, grid.occupied) and torch.equal(other.density, grid.density)
    assert other.updates.item() == 2


def _rays(n=400, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    o = torch.nn.functional.normalize(torch.randn(n, 3, generator=g, dtype=dtype), dim=-1) * 3
    target = (torch.rand(n, 3, generator=g, dtype=dtype) * 2 - 1) * 0.6
    return o, torch.nn.functional.normalize(target - o, dim=-1)


def test_sample_keeps_occupied_cells_only_and_all_samples_in_the_ball():
    grid, ball = OccupancyGrid(resolution=16), Ball(radius=0.4)
    _warm(grid, ball)
    o, d = _rays()
    near, far, hit = ray_box(o, d, 1.0)
    step = 2 * math.sqrt(3) / 256
    dense = uniform_samples(near, far, hit, step_size=step)
    kept = grid.sample(o, d, near, far, hit, step)
    p_dense, p_kept = dense.positions(o, d), kept.positions(o, d)
    assert grid.lookup(p_kept).all()  # nothing from an empty cell
    assert len(kept) < 0.4 * len(dense)
    # Instant-NGP's rule probes one jittered point per cell and update, so cells that the ball only
    # grazes may still read empty after a few updates: nearly all, not all, in-ball samples are kept.
    n_in_ball = int((p_dense.norm(dim=-1) < 0.4).sum())
    assert 0.97 * n_in_ball < int((p_kept.norm(dim=-1) < 0.4).sum()) <= n_in_ball + len(o)
    idx = kept.ray_indices
    assert (idx[1:] >= idx[:-1]).all() and (kept.t_starts[1:][idx[1:] == idx[:-1]] >= kept.t_ends[:-1][idx[1:] == idx[:-1]] - 1e-6).all()


def test_sample_renders_what_dense_sampling_renders():
    grid, ball = OccupancyGrid(resolution=16), Ball(radius=0.4, sigma=5.0)
    _warm(grid, ball)
    o, d = _rays(1000, seed=2, dtype=torch.float64)
    near, far, hit = ray_box(o, d, 1.0)
    step = 2 * math.sqrt(3) / 512

    def alpha(samples):
        sigma = ball.density(samples.positions(o, d))
        return composite(sigma, sigma[:, None], samples, len(o)).alpha

    dense, kept = uniform_samples(near, far, hit, step_size=step), grid.sample(o, d, near, far, hit, step)
    diff = (alpha(dense) - alpha(kept)).abs()
    # hard-edged ball: rays through cells it barely enters can lose their short chord there (see above)
    assert diff.mean() < 0.01 and diff.quantile(0.95) < 0.03
    assert len(kept) < 0.3 * len(dense)


def test_early_stop_drops_samples_behind_an_opaque_surface():
    grid, ball = OccupancyGrid(resolution=16), Ball(radius=0.5, sigma=200.0)
    _warm(grid, ball)
    o, d = _rays(200, seed=1, dtype=torch.float64)
    near, far, hit = ray_box(o, d, 1.0)
    step = 0.01
    full = grid.sample(o, d, near, far, hit, step)
    early = grid.sample(o, d, near, far, hit, step, density_fn=ball.density, early_stop_eps=1e-4)
    assert len(early) < 0.25 * len(full)

    def render(samples):
        sigma = ball.density(samples.positions(o, d))
        return composite(sigma, torch.ones(len(samples), 1, dtype=sigma.dtype), samples, len(o)).alpha

    assert (render(full) - render(early)).abs().max() < 1e-4


def test_empty_grid_gives_no_samples():
    grid = OccupancyGrid(resolution=8)
    grid.occupied.zero_()
    o, d = _rays(20)
    near, far, hit = ray_box(o, d, 1.0)
    assert len(grid.sample(o, d, near, far, hit, 0.05)) == 0


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="resolution=0"):
        OccupancyGrid(resolution=0)
    with pytest.raises(ValueError, match="backend='gpu'"):
        OccupancyGrid(backend="gpu")
    grid = OccupancyGrid(resolution=4)
    with pytest.raises(ValueError, match="step must be"):
        grid.update(Ball().density, -1)
    with pytest.raises(ValueError, match="callable"):
        grid.update(None, 0)
    o, d = _rays(4)
    near, far, hit = ray_box(o, d, 1.0)
    with pytest.raises(ValueError, match="needs a density_fn"):
        grid.sample(o, d, near, far, hit, 0.1, early_stop_eps=1e-3)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs CUDA"):
            OccupancyGrid(resolution=4, backend="nerfacc").sample(o, d, near, far, hit, 0.1)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="nerfacc's occupancy-grid sampler needs a CUDA GPU")
def test_nerfacc_backend_renders_like_torch():
    pytest.importorskip("nerfacc")
    ball = Ball(radius=0.4, sigma=5.0)
    grids = {b: OccupancyGrid(resolution=16, backend=b).cuda() for b in ("torch", "nerfacc")}
    for grid in grids.values():
        _warm(grid, ball)
    assert torch.equal(grids["torch"].occupied, grids["nerfacc"].occupied)
    o, d = (t.cuda() for t in _rays(300, seed=2))
    near, far, hit = ray_box(o, d, 1.0)
    step = 2 * math.sqrt(3) / 512
    alphas = {}
    for name, grid in grids.items():
        samples = grid.sample(o, d, near, far, hit, step)
        sigma = ball.density(samples.positions(o, d))
        alphas[name] = composite(sigma, sigma[:, None], samples, len(o)).alpha
    assert (alphas["torch"] - alphas["nerfacc"]).abs().max() < 3 * 5.0 * step
