"""Volume rendering ops: camera rays against the projection, ray-box / ray-sphere against closed forms,
interval sampling tiles each ray, compositing against a naive per-ray loop (values, gradients,
float64 gradcheck), precision of the packed prefix sums, input checks."""

import math

import pytest
import torch

from gen3d.cameras import orbit_cameras, spherical_cameras
from gen3d.ops.volume import (
    RaySamples,
    camera_rays,
    composite,
    exclusive_segment_cumsum,
    pack_intervals,
    ray_aabb,
    ray_box,
    ray_intervals,
    ray_sphere,
    segment_sum,
    uniform_samples,
)

F64 = torch.float64


# --- rays ------------------------------------------------------------------------------------------

def test_camera_rays_project_back_to_pixel_centers():
    cams = spherical_cameras(torch.tensor([30.0, -120.0]), torch.tensor([20.0, -5.0]), torch.tensor([2.5, 3.0]),
                             torch.tensor([40.0, 60.0]), 7, 5)
    origins, dirs = camera_rays(cams)
    assert origins.shape == dirs.shape == (2, 5, 7, 3)
    torch.testing.assert_close(dirs.norm(dim=-1), torch.ones(2, 5, 7))
    torch.testing.assert_close(origins, cams.eyes[:, None, None].expand(2, 5, 7, 3))
    p = origins + 1.7 * dirs  # points on the rays
    cam = torch.einsum("cij,chwj->chwi", cams.viewmats[:, :3, :3], p) + cams.viewmats[:, None, None, :3, 3]
    assert (cam[..., 2] > 0).all()  # in front of the camera (OpenCV: +z forward)
    uv = torch.einsum("cij,chwj->chwi", cams.K, cam)
    uv = uv[..., :2] / uv[..., 2:]
    j, i = torch.meshgrid(torch.arange(5.0), torch.arange(7.0), indexing="ij")
    expected = torch.stack([i + 0.5, j + 0.5], -1).expand(2, 5, 7, 2)
    torch.testing.assert_close(uv, expected, atol=1e-4, rtol=0)


def test_camera_rays_image_axes_follow_opencv():
    cams = orbit_cameras(1, elevation=0.0, width=8, height=8)  # at +x looking at the origin, +z up
    _, dirs = camera_rays(cams)
    assert dirs[0, 0, 4, 2] > 0 > dirs[0, 7, 4, 2]  # row 0 looks up, the last row down
    assert dirs[0, 4, 7, 1] > 0 > dirs[0, 4, 0, 1]  # the right column looks towards +y


def test_ray_box_closed_form():
    o = torch.tensor([[-3.0, 0.2, 0.1], [0.0, 0.0, 0.0], [-3.0, 5.0, 0.0], [2.0, 2.0, 2.0], [-3.0, 1.0, 0.0]], dtype=F64)
    d = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [-1.0, -1.0, -1.0], [1.0, 0.0, 0.0]], dtype=F64)
    d = torch.nn.functional.normalize(d, dim=-1)
    near, far, hit = ray_box(o, d, 1.0)
    assert hit.tolist() == [True, True, False, True, False]  # the last grazes the face y = 1 (zero length)
    torch.testing.assert_close(near[:2], torch.tensor([2.0, 0.0], dtype=F64))  # inside: starts at the origin
    torch.testing.assert_close(far[:2], torch.tensor([4.0, 1.0], dtype=F64))
    torch.testing.assert_close(near[3], torch.tensor(math.sqrt(3.0), dtype=F64))  # corner to corner
    torch.testing.assert_close(far[3], torch.tensor(3 * math.sqrt(3.0), dtype=F64))
    assert near[2] == far[2] == 0 and not torch.isnan(near).any()


def test_ray_box_entry_and_exit_lie_on_the_surface():
    g = torch.Generator().manual_seed(0)
    o = torch.randn(500, 3, generator=g, dtype=F64) * 2
    aim = (torch.rand(500, 3, generator=g, dtype=F64) * 2 - 1) * 0.6 - o  # half aimed into the box, half random
    d = torch.nn.functional.normalize(torch.cat([aim[:250], torch.randn(250, 3, generator=g, dtype=F64)]), dim=-1)
    near, far, hit = ray_box(o, d, 0.7)
    assert hit[:250].all() and not hit[250:].all()
    outside = o.abs().amax(-1) > 0.7
    for t, rows in ((near, hit & outside), (far, hit)):
        p = o[rows] + d[rows] * t[rows, None]
        torch.testing.assert_close(p.abs().amax(-1), torch.full((int(rows.sum()),), 0.7, dtype=F64))
    lo, hi = ray_aabb(o, d, [-0.7] * 3, [0.7] * 3)[:2]
    torch.testing.assert_close(lo, near)
    torch.testing.assert_close(hi, far)


def test_ray_aabb_asymmetric_box():
    o = torch.tensor([[-5.0, 0.5, 0.5]])
    d = torch.tensor([[1.0, 0.0, 0.0]])
    near, far, hit = ray_aabb(o, d, [0.0, 0.0, 0.0], [1.0, 2.0, 3.0])
    assert hit.item() and near.item() == pytest.approx(5.0) and far.item() == pytest.approx(6.0)


def test_ray_sphere_closed_form():
    o = torch.tensor([[0.0, -4.0, 0.3], [0.1, 0.0, 0.0], [0.0, -4.0, 1.1], [0.0, 4.0, 0.0]], dtype=F64)
    d = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [0.0, 1.0, 0.0]], dtype=F64)
    near, far, hit = ray_sphere(o, d, 1.0)
    half = math.sqrt(1 - 0.3 ** 2)
    assert hit.tolist() == [True, True, False, False]  # the last points away from the ball
    torch.testing.assert_close(near[:2], torch.tensor([4 - half, 0.0], dtype=F64))
    torch.testing.assert_close(far[:2], torch.tensor([4 + half, math.sqrt(1 - 0.01)], dtype=F64))
    assert (near[2:] == 0).all() and (far[2:] == 0).all()


@pytest.mark.parametrize("fn, arg", [(ray_box, 0.0), (ray_sphere, -1.0), (ray_box, "1")])
def test_ray_bounds_reject_bad_inputs(fn, arg):
    with pytest.raises(ValueError, match="must be a positive number"):
        fn(torch.zeros(2, 3), torch.ones(2, 3), arg)
    with pytest.raises(ValueError, match=r"\[R, 3\]"):
        fn(torch.zeros(2, 3), torch.ones(3, 3), 1.0)


# --- sampling --------------------------------------------------------------------------------------

def _check_tiling(samples: RaySamples, near, far, hit):
    idx = samples.ray_indices
    assert (idx[1:] >= idx[:-1]).all()
    assert (samples.deltas > 0).all()
    for r in range(len(near)):
        s, e = samples.t_starts[idx == r], samples.t_ends[idx == r]
        if not hit[r]:
            assert len(s) == 0
            continue
        assert s[0] == near[r] and e[-1] == far[r]
        torch.testing.assert_close(s[1:], e[:-1], rtol=0, atol=0)  # contiguous, ordered
    return torch.bincount(idx, minlength=len(near))


@pytest.mark.parametrize("stratified", [False, True])
def test_uniform_samples_tile_each_ray(stratified):
    near = torch.tensor([0.5, 1.0, 0.0, 2.0])
    far = torch.tensor([2.5, 1.05, 3.0, 2.0])
    hit = torch.tensor([True, True, True, False])
    g = torch.Generator().manual_seed(3) if stratified else None
    counts = _check_tiling(uniform_samples(near, far, hit, step_size=0.1, generator=g), near, far, hit)
    assert counts.tolist() == [20, 1, 30, 0]  # ceil(length / step)
    g = torch.Generator().manual_seed(3) if stratified else None
    counts = _check_tiling(uniform_samples(near, far, hit, n_samples=7, generator=g), near, far, hit)
    assert counts.tolist() == [7, 7, 7, 0]


def test_stratified_samples_jitter_within_half_a_step():
    near, far, hit = torch.zeros(2000), torch.full((2000,), 1.0), torch.ones(2000, dtype=torch.bool)
    plain = uniform_samples(near, far, hit, n_samples=10)
    jittered = uniform_samples(near, far, hit, n_samples=10, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(plain.deltas, torch.full((20000,), 0.1))
    inner = jittered.t_starts.view(2000, 10)[:, 1:]
    offset = inner - plain.t_starts.view(2000, 10)[:, 1:]  # uniform in [-0.05, 0.05)
    assert offset.abs().max() <= 0.05 + 1e-6 and abs(float(offset.mean())) < 2e-3
    assert float(offset.std()) == pytest.approx(0.1 / math.sqrt(12), rel=0.05)


def test_pack_intervals_matches_boolean_masking():
    g = torch.Generator().manual_seed(1)
    near, far = torch.rand(50, generator=g), 1 + torch.rand(50, generator=g)
    bounds, valid = ray_intervals(near, far, torch.rand(50, generator=g) > 0.2, step_size=0.07, generator=g)
    keep = valid & (torch.rand(valid.shape, generator=g) > 0.5)
    s = pack_intervals(bounds, keep)
    assert torch.equal(s.ray_indices, keep.nonzero()[:, 0])
    assert torch.equal(s.t_starts, bounds[:, :-1][keep]) and torch.equal(s.t_ends, bounds[:, 1:][keep])


def test_uniform_samples_reject_bad_inputs():
    near, far, hit = torch.zeros(3), torch.ones(3), torch.ones(3, dtype=torch.bool)
    with pytest.raises(ValueError, match="exactly one"):
        uniform_samples(near, far, hit)
    with pytest.raises(ValueError, match="exactly one"):
        uniform_samples(near, far, hit, n_samples=4, step_size=0.1)
    with pytest.raises(ValueError, match="n_samples"):
        uniform_samples(near, far, hit, n_samples=0)
    with pytest.raises(ValueError, match="bool"):
        uniform_samples(near, far, hit.float(), n_samples=4)


# --- compositing -----------------------------------------------------------------------------------

def _random_samples(n_rays: int, max_per_ray: int, dtype=F64, seed: int = 0, D: int = 3):
    """Packed samples with 0..max_per_ray intervals per ray (some rays empty), random densities and colors."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, max_per_ray + 1, (n_rays,), generator=g)
    counts[0] = 0
    idx = torch.repeat_interleave(torch.arange(n_rays), counts)
    S = len(idx)
    deltas = 0.02 + 0.2 * torch.rand(S, generator=g, dtype=dtype)
    gaps = 0.1 * torch.rand(S, generator=g, dtype=dtype)  # samples need not touch
    starts = torch.zeros(S, dtype=dtype)
    for r in range(n_rays):  # cumulative positions within each ray
        rows = idx == r
        starts[rows] = torch.cumsum(deltas[rows] + gaps[rows], 0) - deltas[rows]
    samples = RaySamples(idx, starts, starts + deltas)
    sigma = 5 * torch.rand(S, generator=g, dtype=dtype) ** 2
    colors = torch.rand(S, D, generator=g, dtype=dtype)
    return samples, sigma, colors


def _naive_composite(sigma, colors, samples, n_rays):
    """The quadrature written as the textbook per-ray loop."""
    weights, rgb, alpha, depth = [], [], [], []
    for r in range(n_rays):
        rows = (samples.ray_indices == r).nonzero()[:, 0].tolist()
        T, acc_c, acc_w, acc_t = 1.0, colors.new_zeros(colors.shape[1]), 0.0, 0.0
        for i in rows:
            a = 1 - torch.exp(-sigma[i] * (samples.t_ends[i] - samples.t_starts[i]))
            w = T * a
            weights.append(w)
            acc_c = acc_c + w * colors[i]
            acc_w = acc_w + w
            acc_t = acc_t + w * 0.5 * (samples.t_starts[i] + samples.t_ends[i])
            T = T * (1 - a)
        rgb.append(acc_c)
        alpha.append(torch.as_tensor(acc_w, dtype=sigma.dtype))
        depth.append(acc_t / acc_w if rows else torch.zeros((), dtype=sigma.dtype))
    return torch.stack(weights), torch.stack(rgb), torch.stack(alpha), torch.stack([torch.as_tensor(d) for d in depth])


def test_composite_matches_naive_loop_values_and_gradients():
    samples, sigma, colors = _random_samples(12, 9)
    sigma.requires_grad_(True)
    colors.requires_grad_(True)
    out = composite(sigma, colors, samples, 12)
    ref = _naive_composite(sigma, colors, samples, 12)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b)
    assert out.alpha[0] == 0 and out.depth[0] == 0  # the empty ray
    g = torch.Generator().manual_seed(5)
    probes = [torch.rand(t.shape, generator=g, dtype=F64) for t in out]
    grads = torch.autograd.grad(sum((p * t).sum() for p, t in zip(probes, out)), (sigma, colors))
    grads_ref = torch.autograd.grad(sum((p * t).sum() for p, t in zip(probes, ref)), (sigma, colors))
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b)


def test_composite_gradcheck():
    samples, sigma, colors = _random_samples(4, 4, seed=2, D=2)

    def f(sigma, colors):
        out = composite(sigma, colors, samples, 4)
        return out.weights, out.colors, out.alpha, out.depth

    assert torch.autograd.gradcheck(f, (sigma.requires_grad_(True), colors.requires_grad_(True)))


def test_composite_float32_matches_float64():
    samples, sigma, colors = _random_samples(40, 30, seed=4)
    ref = composite(sigma, colors, samples, 40)
    samples32 = RaySamples(samples.ray_indices, samples.t_starts.float(), samples.t_ends.float())
    out = composite(sigma.float(), colors.float(), samples32, 40)
    for a, b in zip(out, ref):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=1e-5)


def test_constant_density_segment_renders_beer_lambert_for_any_subdivision():
    near, far, hit = torch.zeros(3, dtype=F64), torch.tensor([1.0, 2.0, 0.5], dtype=F64), torch.ones(3, dtype=torch.bool)
    for n in (1, 7, 64):
        samples = uniform_samples(near, far, hit, n_samples=n, generator=torch.Generator().manual_seed(n))
        out = composite(torch.full((len(samples),), 1.3, dtype=F64), torch.ones(len(samples), 1, dtype=F64), samples, 3)
        torch.testing.assert_close(out.alpha, 1 - torch.exp(-1.3 * far))
        torch.testing.assert_close(out.colors[:, 0], out.alpha)


def test_packed_prefix_sum_is_exact_after_many_rays():
    """The global float64 cumsum carries a large running total; per-ray sums must not lose precision."""
    n_rays, per = 20000, 50
    g = torch.Generator().manual_seed(0)
    values = 100 * torch.rand(n_rays * per, generator=g)  # running total reaches 5e7
    idx = torch.arange(n_rays).repeat_interleave(per)
    got = exclusive_segment_cumsum(values, idx, n_rays).view(n_rays, per)
    v = values.double().view(n_rays, per)
    exact = torch.cumsum(v, 1) - v
    assert (got.double() - exact).abs().max() < 1e-3  # float32 resolution of values up to 5000
    got64 = exclusive_segment_cumsum(values.double(), idx, n_rays).view(n_rays, per)
    assert (got64 - exact).abs().max() < 1e-7


def test_segment_sum():
    idx = torch.tensor([0, 0, 2, 2, 2])
    torch.testing.assert_close(segment_sum(torch.arange(5.0)[:, None].expand(5, 2), idx, 4),
                               torch.tensor([[1.0, 1.0], [0, 0], [9, 9], [0, 0]]))


def test_composite_rejects_bad_inputs():
    samples, sigma, colors = _random_samples(5, 4, seed=1)
    with pytest.raises(ValueError, match="densities must be"):
        composite(sigma[:-1], colors, samples, 5)
    with pytest.raises(ValueError, match="colors must be"):
        composite(sigma, colors[:, 0], samples, 5)
    with pytest.raises(ValueError, match="in \\[0, 3\\)"):
        composite(sigma, colors, samples, 3)
    shuffled = RaySamples(samples.ray_indices.flip(0), samples.t_starts, samples.t_ends)
    with pytest.raises(ValueError, match="sorted"):
        composite(sigma, colors, shuffled, 5)
    with pytest.raises(ValueError, match="RaySamples"):
        composite(sigma, colors, (samples.ray_indices,), 5)


def test_composite_of_no_samples():
    empty = RaySamples(torch.zeros(0, dtype=torch.long), torch.zeros(0), torch.zeros(0))
    out = composite(torch.zeros(0), torch.zeros(0, 3), empty, 4)
    assert out.colors.shape == (4, 3) and (out.alpha == 0).all() and (out.depth == 0).all()
