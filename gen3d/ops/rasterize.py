"""Differentiable rasterization of 3D Gaussians: the public entry point and its backends.

Implements the image formation of 3D Gaussian Splatting [Kerbl et al. 2023, "3D Gaussian Splatting
for Real-Time Radiance Field Rendering"], with the EWA projection of [Zwicker et al. 2002]:
Gaussians are projected to screen space (`gen3d.ops._projection`), then every pixel composites the
Gaussians covering it front to back by camera-space depth:

    alpha_i = min(0.99, o_i exp(-d_i^T Sigma2d_i^-1 d_i / 2))   (pairs with alpha_i < 1/255 skipped)
    color   = sum_i T_i alpha_i c_i + T_final * background,      T_i = prod_{j<i} (1 - alpha_j)

Cameras follow `gen3d.cameras`: OpenCV axes, world-to-camera `viewmats`, K in pixels, pixel
(i, j) centered at (i + 0.5, j + 0.5).

Backends (same signature, parity-tested):

- ``"torch"``: the reference; tile-based, pure torch with a hand-written backward, runs on any
  device and dtype (float64 for gradcheck).
- ``"cpp"``: the same math compiled with C++/OpenMP: projection (`gen3d.ops._project_cpp`), the
  same tile lists and compositing (`gen3d.ops._raster_cpp`); CPU float32/float64 only; built on
  first use (about a minute, needs a C++ compiler and ninja) and cached. Projection and binning
  match torch to rounding and pair for pair; compositing stops a pixel early as 3DGS does (below),
  so its alphas can be lower than torch's by up to 0.01 (in practice < 1e-3, on average ~1e-4).
  3-10x faster than torch (benchmarks/bench_rasterize.py).
- ``"dense"``: all Gaussian-pixel pairs by plain autograd; a second reference and benchmark baseline.
- ``"gsplat"``: gsplat's fused CUDA kernels; CUDA tensors only.
- ``"auto"``: gsplat on CUDA when it imports, cpp on CPU when it builds, else torch (said once).

Deliberate differences from the 3DGS CUDA rasterizer: the torch and dense backends do not stop early
when transmittance falls below 1e-4 (the skipped contributions are < 1e-4 and the op stays smooth);
the cpp backend does, like 3DGS: a pixel stops before the first Gaussian that would take its
transmittance below 1e-4 and leaves out that remaining transmittance (< 1e-4 / (1 - alpha) of that
Gaussian, so < 0.01; see `gen3d.ops._raster_cpp`), and it is not smooth where a pixel's stopping
point changes. Every tile backend pairs a Gaussian with exactly the tiles its alpha >= 1/255
ellipse reaches (radius sqrt(2 ln(255 o)) sigma, at most 3.33 sigma, rather than a 3-sigma box),
so that the tile and dense backends agree to rounding. `radii` still reports the 3DGS 3-sigma radius, which densification
heuristics expect.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from gen3d.errors import Gen3dError, MissingExtra, require
from gen3d.ops import _project_cpp, _raster_cpp
from gen3d.ops._projection import project_gaussians
from gen3d.ops._raster_dense import rasterize_dense
from gen3d.ops._raster_torch import bin_gaussians, rasterize_tiles

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "cpp", "dense", "gsplat")
CPP_DTYPES = (torch.float32, torch.float64)
TILE_SIZES = {"torch": 8, "cpp": 16, "gsplat": 16}  # the fastest tile edge of each tile backend (tile_size=None)
_said_fallback = False


@dataclass
class RasterOutput:
    """Images of C cameras of size H x W rendered from N Gaussians with D color channels."""

    colors: Tensor  # [C, H, W, D] composited over the backgrounds (0 if none)
    alphas: Tensor  # [C, H, W, 1] accumulated opacity 1 - T_final
    depths: Tensor  # [C, H, W, 1] expected camera-space z, sum(w_i z_i) / alpha, 0 where alpha is 0
    means2d: Tensor  # [C, N, 2] projected centers in pixels; retains its grad (dL/dmean2d, for densification)
    radii: Tensor  # [C, N] int32 screen radius in pixels (3 sigma of the major axis), 0 if culled


def rasterize_gaussians(
    means: Tensor,  # [N, 3] world
    quats: Tensor,  # [N, 4] (w, x, y, z), need not be normalized
    scales: Tensor,  # [N, 3] activated (not log)
    opacities: Tensor,  # [N] in [0, 1]
    colors: Tensor,  # [N, D] or [C, N, D] (already evaluated per view)
    viewmats: Tensor,  # [C, 4, 4] world-to-camera (OpenCV axes)
    Ks: Tensor,  # [C, 3, 3]
    width: int,
    height: int,
    backgrounds: Tensor | None = None,  # [C, D] or [D]
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    eps2d: float = 0.3,
    tile_size: int | None = None,
    backend: str = "auto",
) -> RasterOutput:
    """Render N Gaussians into C cameras (see the module docstring for the math and backends).

    Gaussians are culled (radius 0, no contribution) when their center is not beyond `near_plane`
    or not before `far_plane`, or when no pixel of the image could receive alpha >= 1/255 from them
    (off screen or opacity below 1/255). `eps2d` is added to the diagonal of every 2D covariance
    (the 3DGS screen-space low-pass filter). `tile_size` is the tile edge in pixels of the tile
    backends; it does not change the result, only the speed. None picks each backend's fastest
    (`TILE_SIZES`, measured with benchmarks/bench_rasterize.py on 2 CPU cores: the torch backend is
    1.4-2x faster with 8 than with 16, the cpp one 1.1-2.3x faster with 16 than with 8).
    Differentiable w.r.t. means, quats, scales, opacities, colors and backgrounds; `means2d.grad` is
    filled by the backward pass.
    """
    colors, backgrounds = _check_inputs(
        means, quats, scales, opacities, colors, viewmats, Ks, width, height, backgrounds,
        near_plane, far_plane, eps2d, tile_size, backend,
    )
    means, quats, scales, opacities = _cull_nonfinite(means, quats, scales, opacities)
    backend = _choose_backend(backend, means)
    tile_size = TILE_SIZES.get(backend, 16) if tile_size is None else tile_size
    if backend == "gsplat":
        return _rasterize_gsplat(
            means, quats, scales, opacities, colors, viewmats, Ks, width, height, backgrounds,
            near_plane, far_plane, eps2d, tile_size,
        )

    # backend "cpp": projection, binning and compositing all compiled (the projection falls back to torch
    # on its own if only its extension fails to build)
    project = (_project_cpp.project_gaussians_cpp if backend == "cpp" and _project_cpp.project_cpp_available()
               else project_gaussians)
    proj = project(means, quats, scales, opacities, viewmats, Ks, width, height, near_plane, far_plane, eps2d)
    means2d = proj.means2d
    if means2d.requires_grad:
        means2d.retain_grad()
    C, N = proj.depths.shape
    feats = torch.cat([colors.expand(C, N, -1), proj.depths[..., None]], dim=-1)  # [C, N, D + 1]
    opac = opacities.expand(C, N)
    if backend in ("torch", "cpp"):
        binning, composite = ((bin_gaussians, rasterize_tiles) if backend == "torch"
                              else (_raster_cpp.bin_gaussians_cpp, _raster_cpp.rasterize_tiles_cpp))
        bins = binning(
            means2d.detach(), proj.conics.detach(), opac.detach(), proj.extents, proj.depths.detach(), proj.visible,
            width, height, tile_size,
        )
        acc, trans = composite(means2d, proj.conics, opac, feats, bins, width, height, tile_size)
    else:
        acc, trans = rasterize_dense(means2d, proj.conics, opac, feats, proj.depths, proj.visible, width, height)
    alphas = (1.0 - trans)[..., None]  # [C, H, W, 1]
    out_colors = acc[..., :-1]
    if backgrounds is not None:
        out_colors = out_colors + trans[..., None] * backgrounds[:, None, None, :]
    # acc_z is exactly 0 where alpha is 0, so the clamp only guards the division.
    depths = acc[..., -1:] / alphas.clamp_min(1e-10)
    return RasterOutput(out_colors, alphas, depths, means2d, proj.radii)


def _cull_nonfinite(means: Tensor, quats: Tensor, scales: Tensor, opacities: Tensor):
    """Gaussians with a NaN/Inf mean, rotation, scale or opacity become invisible (opacity 0 at the origin, unit
    rotation and scale; no gradient reaches them): the binning would otherwise turn NaN screen extents into tile
    indices (a crash in the compiled backward). One check, and copies only when something is not finite."""
    ok = (torch.isfinite(means).all(-1) & torch.isfinite(quats).all(-1) & torch.isfinite(scales).all(-1)
          & torch.isfinite(opacities))
    if bool(ok.all()):
        return means, quats, scales, opacities
    keep = ok[:, None]
    unit = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=quats.dtype, device=quats.device)
    return (torch.where(keep, means, torch.zeros_like(means)), torch.where(keep, quats, unit),
            torch.where(keep, scales, torch.ones_like(scales)), torch.where(ok, opacities, torch.zeros_like(opacities)))


def _check_inputs(means, quats, scales, opacities, colors, viewmats, Ks, width, height, backgrounds,
                  near_plane, far_plane, eps2d, tile_size, backend):
    """Validate the public arguments; returns colors as [C, N, D] (or [1, N, D]) and backgrounds as [C, D] or None."""
    def fail(msg: str):
        raise ValueError(f"rasterize_gaussians: {msg}")

    tensors = {"means": means, "quats": quats, "scales": scales, "opacities": opacities, "colors": colors, "viewmats": viewmats, "Ks": Ks}
    if backgrounds is not None:
        tensors["backgrounds"] = backgrounds
    for name, t in tensors.items():
        if not isinstance(t, Tensor):
            fail(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if means.dim() != 2 or means.shape[-1] != 3:
        fail(f"means must be [N, 3], got {tuple(means.shape)}")
    N = means.shape[0]
    C = viewmats.shape[0] if viewmats.dim() == 3 else -1
    expected = {"quats": (N, 4), "scales": (N, 3), "opacities": (N,), "viewmats": (C, 4, 4), "Ks": (C, 3, 3)}
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape or C < 1:
            fail(f"{name} must be {_fmt(shape)} for N={N} Gaussians and C={C} cameras, got {tuple(tensors[name].shape)}")
    if not (colors.dim() == 2 and colors.shape[0] == N or colors.dim() == 3 and colors.shape[:2] == (C, N)):
        fail(f"colors must be [N, D] or [C, N, D] with N={N}, C={C}, got {tuple(colors.shape)}")
    D = colors.shape[-1]
    if backgrounds is not None and tuple(backgrounds.shape) not in ((D,), (C, D)):
        fail(f"backgrounds must be [D] or [C, D] with C={C}, D={D}, got {tuple(backgrounds.shape)}")
    dtypes = {name: t.dtype for name, t in tensors.items()}
    devices = {name: str(t.device) for name, t in tensors.items()}
    if len(set(dtypes.values())) != 1 or not means.dtype.is_floating_point:
        fail(f"all tensors must share one floating dtype, got {dtypes}")
    if len(set(devices.values())) != 1:
        fail(f"all tensors must be on one device, got {devices}")
    if not (isinstance(width, int) and isinstance(height, int) and width > 0 and height > 0):
        fail(f"width and height must be positive ints, got {width!r} x {height!r}")
    if tile_size is not None and not (isinstance(tile_size, int) and tile_size > 0):
        fail(f"tile_size must be a positive int or None, got {tile_size!r}")
    if not 0 < near_plane < far_plane:
        fail(f"need 0 < near_plane < far_plane, got near_plane={near_plane}, far_plane={far_plane}")
    if eps2d < 0:
        fail(f"eps2d must be >= 0, got {eps2d}")
    if backend not in BACKENDS:
        fail(f"backend must be one of {BACKENDS}, got {backend!r}")
    colors = colors if colors.dim() == 3 else colors[None]
    if backgrounds is not None:
        backgrounds = backgrounds.expand(C, D)
    return colors, backgrounds


def _fmt(shape) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


def _gsplat_usable(device: torch.device) -> bool:
    # Check CUDA first: on a machine with nvcc but no GPU, importing gsplat's kernels would try to JIT-compile.
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    try:
        require("gsplat", "cuda", "the gsplat rasterizer")
    except MissingExtra:
        return False
    return True


def _choose_backend(backend: str, means: Tensor) -> str:
    global _said_fallback
    if backend == "gsplat":
        if means.device.type != "cuda" or not torch.cuda.is_available():
            raise ValueError(f"rasterize_gaussians: backend='gsplat' needs CUDA tensors and a GPU, got device {means.device}")
        return backend
    if backend == "cpp":
        if means.device.type != "cpu" or means.dtype not in CPP_DTYPES:
            raise ValueError(f"rasterize_gaussians: backend='cpp' needs float32 or float64 CPU tensors, "
                             f"got {means.dtype} on {means.device}")
        if _raster_cpp.load_extension() is None:
            raise Gen3dError(f"rasterize_gaussians: backend='cpp' could not build the C++ rasterizer "
                             f"({_raster_cpp.build_error()}); {_raster_cpp.FIX}, or use backend='torch'")
        return backend
    if backend != "auto":
        return backend
    if _gsplat_usable(means.device):
        return "gsplat"
    cpp_fits = means.device.type == "cpu" and means.dtype in CPP_DTYPES
    if cpp_fits and _raster_cpp.cpp_available():  # builds it on first use; warns once when it cannot
        return "cpp"
    if not _said_fallback and not cpp_fits:
        _said_fallback = True
        reason = ("gsplat is not installed" if means.device.type == "cuda"
                  else f"tensors are {means.dtype} on {means.device.type}")
        log = logger.warning if means.device.type == "cuda" else logger.info
        log("rasterize_gaussians: backend 'auto' uses the pure-torch tile rasterizer (%s)", reason)
    return "torch"


def _rasterize_gsplat(means, quats, scales, opacities, colors, viewmats, Ks, width, height, backgrounds,
                      near_plane, far_plane, eps2d, tile_size) -> RasterOutput:
    """gsplat's CUDA rasterizer [Ye et al. 2024, "gsplat"] converted to a RasterOutput."""
    gsplat = require("gsplat", "cuda", "the gsplat rasterizer")
    C = viewmats.shape[0]
    render, alphas, meta = gsplat.rasterization(
        means, quats, scales, opacities, colors if colors.shape[0] == C else colors[0], viewmats, Ks, width, height,
        near_plane=near_plane, far_plane=far_plane, eps2d=eps2d, tile_size=tile_size, packed=False,
        backgrounds=backgrounds, render_mode="RGB+ED",
    )
    means2d = meta["means2d"]  # [C, N, 2]
    if means2d.requires_grad:
        means2d.retain_grad()
    radii = meta["radii"]
    radii = radii.amax(dim=-1) if radii.dim() == 3 else radii  # gsplat >= 1.5 gives per-axis radii
    # gsplat divides by alpha clamped at 1e-10, so depth is already 0 where nothing was hit.
    return RasterOutput(render[..., :-1], alphas, render[..., -1:], means2d, radii.int())
