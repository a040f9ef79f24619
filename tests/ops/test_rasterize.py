"""Gaussian rasterizer: gradcheck of the tile backend, parity with the all-pairs reference, analytic
single-Gaussian cases, culling, compositing, means2d gradients and input checks (the benchmark's
smoke run is in tests/test_benchmarks.py)."""

import math

import pytest
import torch

from gen3d.cameras import intrinsics, look_at
from gen3d.ops import _raster_torch
from gen3d.ops._projection import gaussian_alpha, project_gaussians
from gen3d.ops._raster_torch import bin_gaussians, rasterize_tiles
from gen3d.ops.rasterize import RasterOutput, rasterize_gaussians

F64 = torch.float64


def _cameras(C: int, width: int, height: int, dtype=F64, distance: float = 3.0, fovy: float = 50.0):
    """C cameras around the origin (viewmats [C, 4, 4], Ks [C, 3, 3])."""
    az = torch.linspace(0, 2 * math.pi, C + 1, dtype=dtype)[:C] + 0.3
    eye = torch.stack([distance * torch.cos(az), distance * torch.sin(az), 0.4 * torch.ones_like(az)], -1)
    return torch.linalg.inv(look_at(eye)), intrinsics(torch.full((C,), fovy, dtype=dtype), width, height)


def _gaussians(N: int, dtype=F64, scale=(0.05, 0.3), spread: float = 0.8, D: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lo, hi = math.log(scale[0]), math.log(scale[1])
    return {
        "means": (torch.rand(N, 3, generator=g, dtype=dtype) * 2 - 1) * spread,
        "quats": torch.randn(N, 4, generator=g, dtype=dtype),
        "scales": torch.exp(lo + (hi - lo) * torch.rand(N, 3, generator=g, dtype=dtype)),
        "opacities": 0.2 + 0.7 * torch.rand(N, generator=g, dtype=dtype),
        "colors": torch.rand(N, D, generator=g, dtype=dtype),
    }


def _render(gauss, viewmats, Ks, width, height, **kw) -> RasterOutput:
    return rasterize_gaussians(**gauss, viewmats=viewmats, Ks=Ks, width=width, height=height, **kw)


def _loss_weights(C, H, W, D, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(C, H, W, k, generator=g, dtype=dtype) for k in (D, 1, 1)]


# --- gradients -------------------------------------------------------------------------------------

@pytest.mark.parametrize("save", [True, False], ids=["saved-weights", "recomputed"])
def test_gradcheck_tile_backend(save, monkeypatch):
    monkeypatch.setattr(_raster_torch, "SAVE_BYTES", (1 << 40) if save else 0)
    C, W, H = 2, 12, 10
    viewmats, Ks = _cameras(C, W, H)
    gauss = _gaussians(4, scale=(0.15, 0.4), spread=0.5)
    gauss["colors"] = torch.rand(C, 4, 3, dtype=F64)  # per-view colors
    bg = torch.rand(C, 3, dtype=F64)
    w_rgb, w_a, w_d = _loss_weights(C, H, W, 3, F64)
    names = ["means", "quats", "scales", "opacities", "colors"]

    def f(means, quats, scales, opacities, colors, bg):
        out = rasterize_gaussians(means, quats, scales, opacities, colors, viewmats, Ks, W, H,
                                  backgrounds=bg, tile_size=4, backend="torch")
        return (out.colors * w_rgb).sum(), (out.alphas * w_a).sum(), (out.depths * w_d).sum()

    inputs = [gauss[k].clone().requires_grad_() for k in names] + [bg.requires_grad_()]
    out = f(*inputs)
    assert out[1] > 1.0  # the Gaussians do cover the image
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


def test_means2d_grad_is_populated_and_matches_finite_differences():
    C, W, H = 2, 14, 11
    viewmats, Ks = _cameras(C, W, H)
    gauss = {k: v.requires_grad_() for k, v in _gaussians(5, scale=(0.1, 0.3), spread=0.5).items()}
    w_rgb, w_a, _ = _loss_weights(C, H, W, 3, F64)
    out = _render(gauss, viewmats, Ks, W, H, tile_size=4, backend="torch")
    ((out.colors * w_rgb).sum() + (out.alphas * w_a).sum()).backward()
    grad = out.means2d.grad
    assert grad is not None and grad.shape == (C, 5, 2) and grad.abs().sum() > 0

    # Finite differences of the same loss w.r.t. the projected centers, other screen-space values fixed.
    with torch.no_grad():
        proj = project_gaussians(gauss["means"], gauss["quats"], gauss["scales"], gauss["opacities"], viewmats, Ks,
                                 W, H, 0.01, 1e10, 0.3)
        feats = torch.cat([gauss["colors"].expand(C, -1, -1), proj.depths[..., None]], -1)
        opac = gauss["opacities"].expand(C, -1)

        def loss(means2d):
            bins = bin_gaussians(means2d, proj.conics, opac, proj.extents, proj.depths, proj.visible, W, H, 4)
            acc, trans = rasterize_tiles(means2d, proj.conics, opac, feats, bins, W, H, 4)
            return (acc[..., :3] * w_rgb).sum() + ((1 - trans)[..., None] * w_a).sum()

        h = 1e-6
        for c, n, k in [(0, 0, 0), (0, 1, 1), (1, 2, 0), (1, 4, 1)]:
            plus, minus = proj.means2d.clone(), proj.means2d.clone()
            plus[c, n, k] += h
            minus[c, n, k] -= h
            fd = (loss(plus) - loss(minus)) / (2 * h)
            assert fd.item() == pytest.approx(grad[c, n, k].item(), rel=1e-5, abs=1e-7)


def test_binning_keeps_every_contributing_pair():
    C, W, H, ts = 1, 45, 38, 8
    viewmats, Ks = _cameras(C, W, H)
    gauss = _gaussians(400, scale=(0.005, 0.15), spread=1.0, seed=3)
    gauss["scales"][:, 0] *= 4  # strongly anisotropic, so many box tiles are missed by the ellipse
    proj = project_gaussians(gauss["means"], gauss["quats"], gauss["scales"], gauss["opacities"], viewmats, Ks,
                             W, H, 0.01, 1e10, 0.3)
    bins = bin_gaussians(proj.means2d, proj.conics, gauss["opacities"][None], proj.extents, proj.depths,
                         proj.visible, W, H, ts)
    tiles_x = math.ceil(W / ts)
    tile_of = torch.repeat_interleave(torch.arange(bins.tile_count.shape[0]), bins.tile_count)
    have = set(zip(tile_of.tolist(), bins.flat_ids.tolist()))
    # brute force: every (tile, Gaussian) with a pixel of alpha >= 1/255
    ys, xs = torch.meshgrid(torch.arange(H, dtype=F64) + 0.5, torch.arange(W, dtype=F64) + 0.5, indexing="ij")
    ids = proj.visible[0].nonzero().squeeze(1)
    d = torch.stack([xs, ys], -1).reshape(-1, 1, 2) - proj.means2d[0, ids]  # [HW, V, 2]
    alpha = gaussian_alpha(gauss["opacities"][ids], proj.conics[0, ids], d[..., 0], d[..., 1])
    pix, g = (alpha > 0).nonzero().unbind(1)
    tiles = (pix // W) // ts * tiles_x + (pix % W) // ts
    need = set(zip(tiles.tolist(), ids[g].tolist()))
    assert need <= have
    assert len(have) < 1.05 * len(need)  # and only a few pairs that do not contribute
    # inside each tile, front to back
    depth = proj.depths.reshape(-1)[bins.flat_ids]
    same_tile = tile_of[1:] == tile_of[:-1]
    assert (depth[1:][same_tile] >= depth[:-1][same_tile]).all()


# --- parity with the all-pairs reference -------------------------------------------------------------

@pytest.mark.parametrize(
    "seed,W,H,tile_size,N",
    [(0, 23, 17, 4, 12), (1, 16, 32, 16, 20), (2, 31, 9, 5, 15), (3, 40, 27, 8, 40)],
)
def test_tile_backend_matches_dense(seed, W, H, tile_size, N):
    C = 2
    viewmats, Ks = _cameras(C, W, H)
    gauss = _gaussians(N, scale=(0.02, 0.5), spread=1.2, D=4, seed=seed)
    gauss["means"][0] = torch.tensor([0.0, 0.0, 0.0], dtype=F64)  # a big one straddling many tile borders
    gauss["scales"][0] = torch.tensor([0.6, 0.3, 0.2], dtype=F64)
    gauss["means"][1] = viewmats[0, :3, :3].t() @ (torch.tensor([0.0, 0.0, -1.0], dtype=F64) - viewmats[0, :3, 3])  # behind camera 0
    bg = torch.rand(4, dtype=F64)
    w_rgb, w_a, w_d = _loss_weights(C, H, W, 4, F64, seed=seed)
    results = {}
    for backend in ("torch", "dense"):
        leaves = {k: v.clone().requires_grad_() for k, v in gauss.items()}
        bgl = bg.clone().requires_grad_()
        out = _render(leaves, viewmats, Ks, W, H, backgrounds=bgl, tile_size=tile_size, backend=backend)
        ((out.colors * w_rgb).sum() + (out.alphas * w_a).sum() + (out.depths * w_d).sum()).backward()
        results[backend] = (out, {k: v.grad for k, v in leaves.items()} | {"bg": bgl.grad, "means2d": out.means2d.grad})
    (ot, gt), (od, gd) = results["torch"], results["dense"]
    assert 0.05 < ot.alphas.mean() < 0.95
    for name in ("colors", "alphas", "depths", "means2d"):
        torch.testing.assert_close(getattr(ot, name), getattr(od, name), atol=1e-12, rtol=1e-10)
    assert torch.equal(ot.radii, od.radii)
    for name in gt:
        torch.testing.assert_close(gt[name], gd[name], atol=1e-11, rtol=1e-9, msg=f"grad {name}")


def test_tile_backend_matches_dense_float32():
    C, W, H = 1, 48, 40
    viewmats, Ks = _cameras(C, W, H, dtype=torch.float32)
    gauss = _gaussians(200, dtype=torch.float32, scale=(0.01, 0.1), seed=5)
    outs = {}
    for backend in ("torch", "dense"):
        leaves = {k: v.clone().requires_grad_() for k, v in gauss.items()}
        out = _render(leaves, viewmats, Ks, W, H, backend=backend)
        (out.colors.sum() + out.depths.sum()).backward()
        outs[backend] = (out, leaves)
    (ot, lt), (od, ld) = outs["torch"], outs["dense"]
    torch.testing.assert_close(ot.colors, od.colors, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ot.depths, od.depths, atol=1e-4, rtol=1e-4)
    for k in lt:
        scale = ld[k].grad.abs().max()
        torch.testing.assert_close(lt[k].grad / scale, ld[k].grad / scale, atol=1e-4, rtol=1e-3)


# --- analytic cases --------------------------------------------------------------------------------

def _single(W=15, H=11, z=2.0, scale=0.05, opacity=0.7, color=(0.2, 0.5, 0.9), near=0.01):
    """One isotropic Gaussian on the optical axis of an identity camera (pixel (7, 5) is centered on it)."""
    viewmats = torch.eye(4, dtype=F64)[None]
    Ks = intrinsics(torch.tensor([60.0], dtype=F64), W, H)
    gauss = {
        "means": torch.tensor([[0.0, 0.0, z]], dtype=F64), "quats": torch.tensor([[1.0, 0.0, 0.0, 0.0]], dtype=F64),
        "scales": torch.full((1, 3), scale, dtype=F64), "opacities": torch.tensor([opacity], dtype=F64),
        "colors": torch.tensor([color], dtype=F64),
    }
    return gauss, viewmats, Ks


@pytest.mark.parametrize("backend", ["torch", "dense"])
def test_single_gaussian_matches_analytic_values(backend):
    gauss, viewmats, Ks = _single(scale=0.2)
    bg = torch.tensor([0.1, 0.1, 0.1], dtype=F64)
    out = _render(gauss, viewmats, Ks, 15, 11, backgrounds=bg, backend=backend, tile_size=4)
    f = Ks[0, 1, 1].item()
    var = (f * 0.2 / 2.0) ** 2 + 0.3  # EWA: (f s / z)^2 plus the eps2d low-pass
    o, c = 0.7, torch.tensor([0.2, 0.5, 0.9], dtype=F64)
    torch.testing.assert_close(out.means2d[0, 0], torch.tensor([7.5, 5.5], dtype=F64))
    assert out.alphas[0, 5, 7, 0].item() == pytest.approx(o)  # the peak pixel
    torch.testing.assert_close(out.colors[0, 5, 7], o * c + (1 - o) * bg)
    a = o * math.exp(-0.5 * 4.0 / var)  # two pixels to the right
    assert out.alphas[0, 5, 9, 0].item() == pytest.approx(a)
    torch.testing.assert_close(out.colors[0, 5, 9], a * c + (1 - a) * bg)
    assert out.depths[0, 5, 7, 0].item() == pytest.approx(2.0)
    assert out.radii[0, 0].item() == math.ceil(3 * math.sqrt(var))


def test_gaussian_behind_camera_is_culled():
    gauss, viewmats, Ks = _single()
    behind = {k: torch.cat([v, v]) for k, v in gauss.items()}
    behind["means"][1, 2] = -2.0  # mirrored behind the camera
    behind["opacities"][1] = 0.99
    one = _render(gauss, viewmats, Ks, 15, 11, backend="torch")
    two = _render(behind, viewmats, Ks, 15, 11, backend="torch")
    assert two.radii[0, 1].item() == 0 and two.radii[0, 0].item() > 0
    torch.testing.assert_close(two.colors, one.colors)
    torch.testing.assert_close(two.alphas, one.alphas)
    near = _render(gauss, viewmats, Ks, 15, 11, backend="torch", near_plane=2.5)  # z = 2 is before the near plane
    assert near.radii.sum() == 0 and near.alphas.abs().sum() == 0


def test_depth_of_opaque_front_gaussian_and_compositing_order():
    gauss, viewmats, Ks = _single(opacity=0.99, scale=0.3)
    pair = {k: torch.cat([v, v]) for k, v in gauss.items()}
    pair["means"][1, 2] = 3.0  # behind the first
    pair["colors"][1] = torch.tensor([1.0, 0.0, 0.0], dtype=F64)
    out = _render(pair, viewmats, Ks, 15, 11, backend="torch", tile_size=4)
    # front alpha 0.99, back alpha 0.99 at the center pixel: w = 0.99 and 0.01 * 0.99
    w1, w2 = 0.99, 0.01 * 0.99
    assert out.depths[0, 5, 7, 0].item() == pytest.approx((w1 * 2.0 + w2 * 3.0) / (w1 + w2))
    assert out.depths[0, 5, 7, 0].item() == pytest.approx(2.0, abs=0.011)
    torch.testing.assert_close(out.colors[0, 5, 7], w1 * pair["colors"][0] + w2 * pair["colors"][1])
    single = _render(gauss, viewmats, Ks, 15, 11, backend="torch")
    covered = single.alphas[..., 0] > 0
    torch.testing.assert_close(single.depths[..., 0][covered], torch.full_like(single.depths[..., 0][covered], 2.0))
    assert (single.depths[..., 0][~covered] == 0).all()


def test_background_compositing_and_empty_image():
    gauss, viewmats, Ks = _single(W=9, H=9)
    bg = torch.tensor([[0.3, 0.6, 0.9]], dtype=F64)
    with_bg = _render(gauss, viewmats, Ks, 9, 9, backgrounds=bg, backend="torch")
    no_bg = _render(gauss, viewmats, Ks, 9, 9, backend="torch")
    torch.testing.assert_close(with_bg.colors, no_bg.colors + (1 - no_bg.alphas) * bg[0])
    gauss["means"][0, 2] = -1.0  # nothing in view
    empty = _render(gauss, viewmats, Ks, 9, 9, backgrounds=bg[0], backend="torch")
    torch.testing.assert_close(empty.colors, bg[0].expand(1, 9, 9, 3))
    assert empty.alphas.abs().sum() == 0 and empty.depths.abs().sum() == 0
    for backend in ("torch", "dense"):  # no Gaussians at all
        none = _render({k: v[:0] for k, v in gauss.items()}, viewmats, Ks, 9, 9, backgrounds=bg[0], backend=backend)
        torch.testing.assert_close(none.colors, bg[0].expand(1, 9, 9, 3))


def test_channels_per_view_colors_and_float32_auto_backend():
    C, W, H = 3, 20, 12
    viewmats, Ks = _cameras(C, W, H, dtype=torch.float32)
    gauss = _gaussians(10, dtype=torch.float32, D=5)
    gauss["colors"] = torch.rand(C, 10, 5)
    bg = torch.rand(C, 5)
    out = _render(gauss, viewmats, Ks, W, H, backgrounds=bg)  # auto: cpp on CPU (no pixel nears T = 1e-4 here), or torch
    torch.testing.assert_close(out.colors, _render(gauss, viewmats, Ks, W, H, backgrounds=bg, backend="torch").colors)
    assert out.colors.shape == (C, H, W, 5) and out.alphas.shape == (C, H, W, 1) and out.depths.shape == (C, H, W, 1)
    assert out.means2d.shape == (C, 10, 2) and out.radii.shape == (C, 10) and out.radii.dtype == torch.int32
    assert out.colors.dtype == torch.float32


# --- input checks ----------------------------------------------------------------------------------

def test_bad_inputs_raise_value_errors_echoing_them():
    viewmats, Ks = _cameras(2, 8, 8)
    gauss = _gaussians(3)
    cases = [
        ({"means": torch.zeros(3, 2, dtype=F64)}, "means must be"),
        ({"quats": torch.zeros(3, 3, dtype=F64)}, r"quats must be \[3, 4\].*got \(3, 3\)"),
        ({"colors": torch.zeros(4, 3, dtype=F64)}, "colors must be"),
        ({"opacities": torch.zeros(3)}, "one floating dtype"),
        ({"backgrounds": torch.zeros(3, 3, dtype=F64)}, "backgrounds must be"),
        ({"backend": "cuda"}, "backend must be"),
        ({"tile_size": 0}, "tile_size"),
        ({"width": 0}, "width and height"),
        ({"near_plane": 0.0}, "near_plane"),
        ({"backend": "gsplat"}, "needs CUDA"),
    ]
    for change, pattern in cases:
        kwargs = dict(gauss, viewmats=viewmats, Ks=Ks, width=8, height=8) | change
        with pytest.raises(ValueError, match=pattern):
            rasterize_gaussians(**kwargs)


# --- gsplat parity (CUDA only) ---------------------------------------------------------------------

@pytest.mark.cuda
def test_matches_gsplat_on_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    pytest.importorskip("gsplat")
    C, W, H = 2, 64, 48
    viewmats, Ks = _cameras(C, W, H, dtype=torch.float32)
    gauss = _gaussians(300, dtype=torch.float32, scale=(0.01, 0.1))
    outs = {}
    for backend in ("torch", "gsplat"):
        leaves = {k: v.cuda().requires_grad_() for k, v in gauss.items()}
        out = _render(leaves, viewmats.cuda(), Ks.cuda(), W, H, backend=backend)
        (out.colors.sum() + out.alphas.sum()).backward()
        outs[backend] = (out, leaves)
    (ot, lt), (og, lg) = outs["torch"], outs["gsplat"]
    # gsplat stops a pixel once T < 1e-4 and clamps alpha at 0.999: small differences are expected.
    torch.testing.assert_close(ot.colors, og.colors, atol=2e-3, rtol=1e-2)
    torch.testing.assert_close(ot.alphas, og.alphas, atol=2e-3, rtol=1e-2)
    torch.testing.assert_close(ot.means2d, og.means2d, atol=1e-3, rtol=1e-4)
    for k in ("means", "colors", "opacities"):
        scale = lg[k].grad.abs().max()
        torch.testing.assert_close(lt[k].grad / scale, lg[k].grad / scale, atol=2e-2, rtol=5e-2)


@pytest.mark.parametrize("backend", ["torch", "cpp", "dense"])
def test_nonfinite_gaussians_are_invisible_and_get_no_gradient(backend):
    gauss = _gaussians(12)
    viewmats, Ks = _cameras(2, 24, 20)
    bad = {k: v.clone() for k, v in gauss.items()}
    bad["means"][3, 0] = math.nan
    bad["scales"][5, 1] = math.inf
    bad["quats"][7] = math.nan
    bad["opacities"][9] = math.nan
    keep = torch.ones(12, dtype=torch.bool)
    keep[[3, 5, 7, 9]] = False
    good = _render({k: v[keep] for k, v in gauss.items()}, viewmats, Ks, 24, 20, backend=backend)
    for v in bad.values():
        v.requires_grad_(True)
    out = _render(bad, viewmats, Ks, 24, 20, backend=backend)
    torch.testing.assert_close(out.colors, good.colors)
    torch.testing.assert_close(out.alphas, good.alphas)
    assert (out.radii[:, ~keep] == 0).all()
    out.colors.sum().backward()
    for v in bad.values():
        assert torch.isfinite(v.grad).all() and (v.grad[~keep] == 0).all()
