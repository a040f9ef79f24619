"""The compiled C++ projection: parity of every output and of the gradients with the torch reference
`project_gaussians` (culled, off-screen, degenerate and non-normalized Gaussians included), gradcheck,
and the torch fallback when cameras need gradients. Skips when the extension cannot be built."""

import pytest
import torch

from gen3d.ops import _project_cpp
from gen3d.ops._project_cpp import project_gaussians_cpp
from gen3d.ops._projection import project_gaussians
from tests.ops.test_rasterize import _cameras, _gaussians

F64 = torch.float64
W, H = 40, 30
NEAR, FAR, EPS2D = 0.01, 3.6, 0.3  # far cuts through the scene (cameras at distance 3)


@pytest.fixture(autouse=True)
def ext():
    if not _project_cpp.project_cpp_available():
        pytest.skip(f"the C++ projection cannot be built here: {_project_cpp.build_error()}")


def _scene(dtype, C=3, N=400, seed=0):
    """Gaussians of every kind: ordinary, behind some cameras or beyond far, far off screen, near-zero
    scales, non-normalized quaternions and opacities below 1/255."""
    viewmats, Ks = _cameras(C, W, H, dtype=dtype)
    gauss = _gaussians(N, dtype=dtype, scale=(0.02, 0.4), spread=1.0, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    q = N // 8
    gauss["means"][:q] *= 4.0  # many behind a camera, beyond far or off screen
    gauss["means"][q:2 * q, 2] += 6.0  # far above every camera: off screen
    gauss["scales"][2 * q:3 * q, 0] = 1e-9  # degenerate (flat) Gaussians
    gauss["scales"][3 * q:4 * q] = 1e-9  # and points
    gauss["quats"] *= torch.exp(2 * torch.randn(N, 1, generator=g, dtype=dtype))  # |q| from ~0.02 to ~50
    gauss["opacities"][4 * q:4 * q + 10] = 1e-3  # transparent: culled
    del gauss["colors"]
    return gauss, viewmats, Ks


def _project(fn, gauss, viewmats, Ks, eps2d=EPS2D):
    return fn(gauss["means"], gauss["quats"], gauss["scales"], gauss["opacities"], viewmats, Ks, W, H, NEAR, FAR, eps2d)


def _grads(fn, gauss, viewmats, Ks, seed=2):
    """Outputs and d(random loss on means2d, conics, depths)/d(means, quats, scales)."""
    leaves = {k: v.clone().requires_grad_(k != "opacities") for k, v in gauss.items()}
    proj = _project(fn, leaves, viewmats, Ks)
    g = torch.Generator().manual_seed(seed)
    loss = sum((out * torch.randn(out.shape, generator=g, dtype=out.dtype)).sum()
               for out in (proj.means2d, proj.conics, proj.depths))
    loss.backward()
    return proj, [leaves[k].grad for k in ("means", "quats", "scales")]


def _assert_close(actual, expected, rtol):
    # Behind-camera Gaussians project far away (tx / near), so tolerances scale with each tensor's range.
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * expected.abs().max().item())


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-10), (torch.float32, 1e-5)], ids=["f64", "f32"])
def test_outputs_match_torch(dtype, rtol):
    gauss, viewmats, Ks = _scene(dtype)
    ref = _project(project_gaussians, gauss, viewmats, Ks)
    out = _project(project_gaussians_cpp, gauss, viewmats, Ks)
    vis = ref.visible
    assert 0 < vis.sum() < vis.numel() and (ref.depths <= NEAR).any() and (ref.depths >= FAR).any()
    assert torch.equal(out.visible, ref.visible)
    assert torch.equal(out.radii, ref.radii)
    assert out.radii.dtype == torch.int32
    for name in ("means2d", "conics", "depths", "extents"):
        _assert_close(getattr(out, name), getattr(ref, name), rtol)


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-10), (torch.float32, 1e-4)], ids=["f64", "f32"])
def test_gradients_match_torch_autograd(dtype, rtol):
    gauss, viewmats, Ks = _scene(dtype)
    _, ref = _grads(project_gaussians, gauss, viewmats, Ks)
    _, out = _grads(project_gaussians_cpp, gauss, viewmats, Ks)
    for name, a, e in zip(("means", "quats", "scales"), out, ref):
        assert a.abs().sum() > 0, name
        _assert_close(a, e, rtol)


def test_gradients_of_single_outputs_and_small_eps2d():
    """Each output alone (the others' gradients are None in the backward), and eps2d = 0."""
    gauss, viewmats, Ks = _scene(F64, N=64, seed=3)
    gauss["scales"] = gauss["scales"].clamp_min(0.05)  # keep det well away from 0 without the low-pass
    for eps2d in (0.0, EPS2D):
        for pick in ("means2d", "conics", "depths"):
            grads = []
            for fn in (project_gaussians, project_gaussians_cpp):
                leaves = {k: v.clone().requires_grad_(k != "opacities") for k, v in gauss.items()}
                getattr(_project(fn, leaves, viewmats, Ks, eps2d), pick).sum().backward()
                grads.append([leaves[k].grad for k in ("means", "quats", "scales")])
            for a, e in zip(*grads):
                a = torch.zeros_like(e) if a is None else a
                _assert_close(a, e if e is not None else torch.zeros_like(a), 1e-10)


def test_gradcheck():
    viewmats, Ks = _cameras(2, 12, 10)
    gauss = _gaussians(5, scale=(0.1, 0.4), spread=1.5)
    gauss["quats"] *= 3.0
    op = gauss["opacities"]

    def f(means, quats, scales):
        p = project_gaussians_cpp(means, quats, scales, op, viewmats, Ks, 12, 10, NEAR, 3.2, EPS2D)
        return p.means2d, p.conics, p.depths

    inputs = [gauss[k].clone().requires_grad_() for k in ("means", "quats", "scales")]
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_results_do_not_depend_on_threads():
    gauss, viewmats, Ks = _scene(torch.float32, N=2000)
    threads = torch.get_num_threads()
    try:
        runs = []
        for n in (1, 3):
            torch.set_num_threads(n)
            proj, grads = _grads(project_gaussians_cpp, gauss, viewmats, Ks)
            runs.append([proj.means2d, proj.conics, proj.radii, *grads])
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_camera_gradients_fall_back_to_torch():
    gauss, viewmats, Ks = _scene(F64, N=32)
    viewmats = viewmats.clone().requires_grad_()
    proj = _project(project_gaussians_cpp, gauss, viewmats, Ks)
    proj.means2d.sum().backward()
    assert viewmats.grad is not None and viewmats.grad.abs().sum() > 0
