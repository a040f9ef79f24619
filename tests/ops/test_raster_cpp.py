"""The compiled C++ tile rasterizer (backend "cpp"): parity of outputs and gradients with the torch reference,
gradcheck, edge cases, early termination, threads and backend selection. Tests that need the extension
skip when it cannot be built; the fallback tests run either way."""

import logging

import pytest
import torch

from gen3d.errors import Gen3dError
from gen3d.ops import _raster_cpp, rasterize
from gen3d.ops._projection import project_gaussians
from gen3d.ops._raster_torch import bin_gaussians
from gen3d.ops.rasterize import rasterize_gaussians
from tests.ops.test_rasterize import _cameras, _gaussians, _loss_weights, _render, _single

F64 = torch.float64


@pytest.fixture
def ext():
    module = _raster_cpp.load_extension()
    if module is None:
        pytest.skip(f"the C++ rasterizer cannot be built here: {_raster_cpp.build_error()}")
    return module


@pytest.fixture
def no_early_stop(monkeypatch):
    monkeypatch.setattr(_raster_cpp, "T_MIN", 0.0)


def _run(gauss, viewmats, Ks, W, H, backend, bg=None, tile_size=16, seed=1):
    """Outputs and gradients (leaves, background, means2d) of a random loss on colors, alphas and depths."""
    C, D = viewmats.shape[0], gauss["colors"].shape[-1]
    leaves = {k: v.clone().requires_grad_() for k, v in gauss.items()}
    bgl = None if bg is None else bg.clone().requires_grad_()
    out = _render(leaves, viewmats, Ks, W, H, backgrounds=bgl, tile_size=tile_size, backend=backend)
    w_rgb, w_a, w_d = _loss_weights(C, H, W, D, gauss["means"].dtype, seed=seed)
    loss = (out.colors * w_rgb).sum() + (out.alphas * w_a).sum() + (out.depths * w_d).sum()
    if loss.requires_grad:
        loss.backward()
    grads = {k: v.grad for k, v in leaves.items()} | {"means2d": out.means2d.grad}
    if bgl is not None:
        grads["bg"] = bgl.grad
    return out, grads


def _assert_parity(gauss, viewmats, Ks, W, H, bg=None, tile_size=16, rtol=1e-6, atol=1e-9):
    (ot, gt), (oc, gc) = (_run(gauss, viewmats, Ks, W, H, b, bg, tile_size) for b in ("torch", "cpp"))
    for name in ("colors", "alphas", "depths", "means2d"):
        torch.testing.assert_close(getattr(oc, name), getattr(ot, name), rtol=rtol, atol=atol, msg=name)
    assert torch.equal(oc.radii, ot.radii)
    for name in gt:
        if gt[name] is None:
            assert gc[name] is None, name
        else:
            torch.testing.assert_close(gc[name], gt[name], rtol=rtol, atol=atol, msg=f"grad {name}")
    return ot


# --- parity with the torch reference -----------------------------------------------------------------

@pytest.mark.parametrize(
    "seed,C,W,H,tile_size,N",
    [(0, 1, 32, 32, 16, 30), (1, 2, 23, 17, 4, 25), (2, 3, 31, 9, 8, 20), (3, 2, 40, 27, 16, 60)],
)
def test_matches_torch_float64(ext, no_early_stop, seed, C, W, H, tile_size, N):
    viewmats, Ks = _cameras(C, W, H)
    gauss = _gaussians(N, scale=(0.02, 0.5), spread=1.2, D=4, seed=seed)
    gauss["means"][0] = torch.zeros(3, dtype=F64)  # a big one straddling many tile borders
    gauss["scales"][0] = torch.tensor([0.6, 0.3, 0.2], dtype=F64)
    gauss["means"][1] = viewmats[0, :3, :3].t() @ (torch.tensor([0.0, 0.0, -1.0], dtype=F64) - viewmats[0, :3, 3])
    if seed % 2:
        gauss["colors"] = torch.rand(C, N, 4, dtype=F64, generator=torch.Generator().manual_seed(seed))  # per view
    out = _assert_parity(gauss, viewmats, Ks, W, H, bg=torch.rand(C, 4, dtype=F64), tile_size=tile_size)
    assert 0.05 < out.alphas.mean() < 0.95


def test_matches_torch_float32_with_early_stop(ext):
    C, W, H = 2, 48, 40
    viewmats, Ks = _cameras(C, W, H, dtype=torch.float32)
    gauss = _gaussians(200, dtype=torch.float32, scale=(0.01, 0.1), seed=5)
    (ot, gt), (oc, gc) = (_run(gauss, viewmats, Ks, W, H, b, tile_size=8) for b in ("torch", "cpp"))
    assert oc.colors.dtype == torch.float32
    torch.testing.assert_close(oc.colors, ot.colors, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(oc.alphas, ot.alphas, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(oc.depths, ot.depths, atol=1e-3, rtol=1e-4)
    for name in gt:
        scale = gt[name].abs().max()
        torch.testing.assert_close(gc[name] / scale, gt[name] / scale, atol=1e-4, rtol=1e-3, msg=f"grad {name}")


def _screen_inputs(gauss, viewmats, Ks, W, H, ts):
    """Leaves (means2d, conics, opacities, feats) of the compositing op, and their bins."""
    C, N = viewmats.shape[0], gauss["means"].shape[0]
    proj = project_gaussians(gauss["means"], gauss["quats"], gauss["scales"], gauss["opacities"], viewmats, Ks,
                             W, H, 0.01, 1e10, 0.3)
    opac = gauss["opacities"].expand(C, -1).contiguous()
    feats = torch.cat([torch.rand(C, N, 3, dtype=F64), proj.depths[..., None]], -1)
    bins = bin_gaussians(proj.means2d, proj.conics, opac, proj.extents, proj.depths, proj.visible, W, H, ts)
    return [t.detach().clone().requires_grad_() for t in (proj.means2d, proj.conics, opac, feats)], bins


@pytest.mark.parametrize("stacked", [False, True], ids=["no-early-stop", "early-stop"])
def test_gradcheck_low_level(ext, stacked):
    """Gradients of the compositing op by finite differences; with t_min = 1e-4 on a scene where pixels do stop
    (the op is smooth away from the points where a pixel's stopping Gaussian changes)."""
    C, W, H, ts = 2, 11, 9, 4
    viewmats, Ks = _cameras(C, W, H)
    if stacked:  # 8 broad layers of alpha ~0.85 along the line of sight of camera 0
        gauss = _gaussians(8, scale=(0.5, 0.7), spread=0.05, seed=4)
        gauss["opacities"][:] = 0.85
        t_min = 1e-4
    else:
        gauss = _gaussians(5, scale=(0.15, 0.4), spread=0.5)
        t_min = 0.0
    inputs, bins = _screen_inputs(gauss, viewmats, Ks, W, H, ts)
    w_acc, w_t = torch.rand(C, H, W, 4, dtype=F64), torch.rand(C, H, W, dtype=F64)

    def f(means2d, conics, opacities, feats, t_min=t_min):
        acc, t_final = _raster_cpp.rasterize_tiles_cpp(means2d, conics, opacities, feats, bins, W, H, ts, t_min=t_min)
        return (acc * w_acc).sum(), (t_final * w_t).sum()

    assert (1 - f(*inputs)[1].detach() / w_t.sum()) > 0.1  # the Gaussians do cover the image
    if stacked:  # pixels do stop: their transmittance differs from the one without early termination
        assert f(*inputs)[1].detach() > f(*inputs, t_min=0.0)[1].detach() + 1e-4
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


# --- binning -----------------------------------------------------------------------------------------

def _screen_scene(C, N, W, H, dtype, seed):
    """Random screen-space inputs of `bin_gaussians`: partly off screen, sigmas from 0.1 to 100 pixels,
    some behind the camera or below 1/255 opacity (not visible)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.rand(*shape, generator=g, dtype=F64)

    means2d = torch.stack([r(C, N) * (W + 40) - 20, r(C, N) * (H + 40) - 20], -1)
    sx, sy, rho = 10 ** (r(C, N) * 3 - 1), 10 ** (r(C, N) * 3 - 1), (r(C, N) * 2 - 1) * 0.95
    cov = torch.stack([sx * sx, rho * sx * sy, sy * sy], -1)
    det = cov[..., 0] * cov[..., 2] - cov[..., 1] ** 2
    conics = torch.stack([cov[..., 2] / det, -cov[..., 1] / det, cov[..., 0] / det], -1)
    opac = r(C, N) * 1.01
    radius = torch.sqrt(2 * torch.log((opac * 255).clamp_min(1)))  # as in project_gaussians
    extents = torch.stack([radius * sx, radius * sy], -1) * (1 + 1e-4) + 1e-4
    depths = r(C, N) * 10 - 1
    lo, hi = means2d - extents, means2d + extents
    visible = (depths > 0.1) & (opac >= 1 / 255) & (hi > 0).all(-1) & (lo[..., 0] < W) & (lo[..., 1] < H)
    return [t.to(dtype) for t in (means2d, conics, opac, extents, depths)] + [visible]


def _assert_same_bins(args, W, H, ts):
    ref, cpp = bin_gaussians(*args, W, H, ts), _raster_cpp.bin_gaussians_cpp(*args, W, H, ts)
    assert (cpp.tiles_x, cpp.tiles_y) == (ref.tiles_x, ref.tiles_y)
    for name in ("flat_ids", "tile_start", "tile_count"):
        assert torch.equal(getattr(cpp, name), getattr(ref, name)), name
    return ref


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("ts", [8, 16])
@pytest.mark.parametrize("seed,C,N,W,H", [(0, 1, 400, 64, 64), (1, 3, 300, 37, 23), (2, 2, 500, 50, 61),
                                           (3, 2, 1, 17, 9), (4, 2, 0, 20, 20)])
def test_binning_matches_torch(ext, dtype, ts, seed, C, N, W, H):
    args = _screen_scene(C, N, W, H, dtype, seed)
    ref = _assert_same_bins(args, W, H, ts)
    if N > 1:
        assert 0 < args[-1].sum() < C * N and ref.num_pairs > args[-1].sum()  # some culled, some multi-tile


@pytest.mark.parametrize("case", ["ties", "on-pixel-centers", "nothing-visible"])
def test_binning_matches_torch_borderline(ext, case):
    W, H, ts = 40, 28, 8
    means2d, conics, opac, extents, depths, visible = _screen_scene(2, 300, W, H, torch.float32, 9)
    if case == "ties":  # equal depths keep index order in both (a stable sort)
        depths = depths.round().abs() + 1
    elif case == "on-pixel-centers":  # centers and ellipse edges on pixel centers and tile borders
        means2d = (means2d * 2).round() / 2
        conics = conics.clone()
        conics[..., 1] = 0
        opac = torch.full_like(opac, 0.8)
    else:
        visible = torch.zeros_like(visible)
    ref = _assert_same_bins((means2d, conics, opac, extents, depths, visible), W, H, ts)
    assert (ref.num_pairs == 0) == (case == "nothing-visible")


@pytest.mark.parametrize("case", ["behind-camera", "degenerate", "huge", "odd-size", "single-pixel"])
def test_binning_of_projected_scenes_matches_torch(ext, case):
    gauss, viewmats, Ks, W, H = _edge_scene(case)
    for dtype in (torch.float32, F64):
        g = {k: v.to(dtype) for k, v in gauss.items()}
        proj = project_gaussians(g["means"], g["quats"], g["scales"], g["opacities"], viewmats.to(dtype),
                                 Ks.to(dtype), W, H, 0.01, 1e10, 0.3)
        opac = g["opacities"].expand(2, -1)
        for ts in (4, 16):
            _assert_same_bins((proj.means2d, proj.conics, opac, proj.extents, proj.depths, proj.visible), W, H, ts)


# --- edge cases --------------------------------------------------------------------------------------

def _edge_scene(case: str):
    """(gauss, viewmats, Ks, W, H) of one edge case."""
    W, H = {"single-pixel": (1, 1), "odd-size": (19, 13)}.get(case, (40, 32))
    viewmats, Ks = _cameras(2, W, H)
    gauss = _gaussians(12, scale=(0.03, 0.2), spread=0.6, seed=7)
    if case == "behind-camera":
        eye = torch.linalg.inv(viewmats[0])[:3, 3]
        gauss["means"][:6] = 2.0 * eye  # behind camera 0, in view of camera 1
    elif case == "degenerate":
        gauss["scales"][:, 0] = 1e-8  # flat discs and needles: near-singular 3D covariances
        gauss["scales"][::2, 1] = 1e-8
    elif case == "huge":
        gauss["scales"][:3] = 4.0  # cover every tile
        gauss["opacities"][:3] = 0.3
    elif case == "mostly-empty":
        gauss = {k: v[:2] for k, v in gauss.items()}
        gauss["means"][:] = torch.tensor([0.5, -0.5, 0.5], dtype=F64)
        gauss["scales"][:] = 0.02
    elif case == "none-visible":
        gauss["means"][:, 2] += 100.0  # far above both cameras, out of view
    elif case == "no-gaussians":
        gauss = {k: v[:0] for k, v in gauss.items()}
    return gauss, viewmats, Ks, W, H


@pytest.mark.parametrize(
    "case", ["behind-camera", "degenerate", "huge", "mostly-empty", "single-pixel", "odd-size", "none-visible",
             "no-gaussians"],
)
def test_edge_cases_match_torch(ext, no_early_stop, case):
    gauss, viewmats, Ks, W, H = _edge_scene(case)
    bg = torch.rand(2, 3, dtype=F64)
    out = _assert_parity(gauss, viewmats, Ks, W, H, bg=bg, tile_size=8)
    covered = (out.radii > 0).sum().item()
    if case in ("none-visible", "no-gaussians"):
        assert covered == 0
        torch.testing.assert_close(out.colors, bg[:, None, None, :].expand(2, H, W, 3))
    else:
        assert covered > 0
    if case == "behind-camera":
        assert (out.radii[0, :6] == 0).all() and (out.radii[1, :6] > 0).any()
    if case == "huge":
        assert (out.alphas > 0.3).all()


def test_early_stop_leaves_out_at_most_the_remaining_transmittance(ext):
    """Many layers of alpha <= 0.9: the cpp backend stops a pixel before the Gaussian that would take T below
    1e-4 (3DGS), the torch one composites every layer; what is left out is T_cpp - T_torch < 1e-4 / (1 - 0.9)."""
    gauss, viewmats, Ks = _single(W=24, H=20, scale=0.4, opacity=0.9)
    n = 30
    gauss = {k: v.repeat(n, *([1] * (v.dim() - 1))) for k, v in gauss.items()}
    gauss["means"][:, 2] = torch.linspace(2.0, 4.0, n, dtype=F64)
    gauss["colors"] = torch.rand(n, 3, dtype=F64)
    (ot, _), (oc, gc) = (_run(gauss, viewmats, Ks, 24, 20, b, tile_size=8) for b in ("torch", "cpp"))
    t_torch, t_cpp = 1 - ot.alphas.detach(), 1 - oc.alphas.detach()
    assert (t_torch < 1e-4).any(), "the scene should take some pixels below T = 1e-4"
    assert (t_cpp >= 1e-4 * (1 - 1e-12)).all()  # no pixel went below the threshold
    left_out = t_cpp - t_torch  # weight of the Gaussians the cpp backend skipped
    assert (left_out > -1e-12).all() and left_out.max() < 1e-4 / (1 - 0.9)
    assert left_out.max() > 1e-4  # the bound is not 1e-4: the stopping Gaussian's weight is left out too
    assert ((oc.colors - ot.colors).abs().detach() <= left_out + 1e-12).all()  # colors <= 1
    acc_z_t, acc_z_c = ot.depths * ot.alphas, oc.depths * oc.alphas
    assert ((acc_z_c - acc_z_t).abs().detach() <= 4.0 * left_out + 1e-12).all()  # depths <= 4
    assert all(torch.isfinite(g).all() for g in gc.values() if g is not None)


def test_two_threads_match_one(ext):
    viewmats, Ks = _cameras(2, 33, 21)
    gauss = _gaussians(40, scale=(0.02, 0.4), spread=1.0, seed=11)
    one = _run(gauss, viewmats, Ks, 33, 21, "cpp", tile_size=8)
    torch.set_num_threads(2)
    try:
        two = _run(gauss, viewmats, Ks, 33, 21, "cpp", tile_size=8)
    finally:
        torch.set_num_threads(1)
    torch.testing.assert_close(two[0].colors, one[0].colors, rtol=0, atol=0)
    for name in one[1]:  # per-pair gradients are summed in pair order: bitwise the same
        torch.testing.assert_close(two[1][name], one[1][name], rtol=0, atol=0, msg=name)


# --- building and backend selection -----------------------------------------------------------------

@pytest.fixture
def unbuildable(monkeypatch):
    """Pretend the extension failed to build, with a known reason (restored after the test)."""
    def fail():
        raise RuntimeError("Error building extension 'x'\nrasterize_cpu.cpp:1: error: no compiler here")

    ext = _raster_cpp.EXTENSION
    monkeypatch.setattr(_raster_cpp, "EXTENSION", _raster_cpp.CppExtension(ext.source, ext.prefix, ext.what,
                                                                           ext.fallback, build=fail))


def test_failed_build_falls_back_to_torch_with_one_warning(unbuildable, caplog):
    viewmats, Ks = _cameras(1, 12, 10)
    gauss = _gaussians(5)
    with caplog.at_level(logging.INFO, logger="gen3d.ops"):
        auto = [_render(gauss, viewmats, Ks, 12, 10) for _ in range(2)]
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in caplog.records]
    message = warnings[0].getMessage()
    assert "no compiler here" in message and "pure-torch" in message and "pip install ninja" in message
    assert _raster_cpp.load_extension() is None and not _raster_cpp.cpp_available()
    torch.testing.assert_close(auto[0].colors, _render(gauss, viewmats, Ks, 12, 10, backend="torch").colors)
    with pytest.raises(Gen3dError, match="could not build the C.. rasterizer.*no compiler here.*backend='torch'"):
        _render(gauss, viewmats, Ks, 12, 10, backend="cpp")


def test_cpp_backend_needs_cpu_float_tensors():
    viewmats, Ks = _cameras(1, 8, 8)
    gauss = {k: v.to(torch.bfloat16) for k, v in _gaussians(3).items()}
    with pytest.raises(ValueError, match="float32 or float64 CPU tensors, got torch.bfloat16"):
        rasterize_gaussians(**gauss, viewmats=viewmats.to(torch.bfloat16), Ks=Ks.to(torch.bfloat16), width=8,
                            height=8, backend="cpp")


def test_auto_picks_cpp_on_cpu(ext, monkeypatch):
    picked = []
    real = _raster_cpp.rasterize_tiles_cpp
    monkeypatch.setattr(_raster_cpp, "rasterize_tiles_cpp", lambda *a, **k: picked.append(True) or real(*a, **k))
    viewmats, Ks = _cameras(1, 12, 10, dtype=torch.float32)
    _render(_gaussians(5, dtype=torch.float32), viewmats, Ks, 12, 10)
    assert picked and "cpp" in rasterize.BACKENDS


def test_edited_source_gets_a_new_extension_name(tmp_path, monkeypatch):
    name = _raster_cpp._extension_name()
    edited = tmp_path / "rasterize_cpu.cpp"
    edited.write_bytes(_raster_cpp.SOURCE.read_bytes() + b"\n// edited\n")
    monkeypatch.setattr(_raster_cpp, "SOURCE", edited)
    assert _raster_cpp._extension_name() != name and _raster_cpp._extension_name().startswith("gen3d_rasterize_cpu_")
    monkeypatch.setenv("GEN3D_CACHE", str(tmp_path))
    assert _raster_cpp.cache_dir() == tmp_path / "torch_extensions" / torch.__version__

