"""The compiled CPU tile rasterizer: the binning and compositing ops of `_raster_torch` as a C++/OpenMP extension.

`bin_gaussians_cpp` makes exactly the pairs of `bin_gaussians`, in the same order (same floating-point
operations in the inputs' precision; OpenMP over cameras). `rasterize_tiles_cpp` has the math and the
signature of `rasterize_tiles`; the kernels are in csrc/rasterize_cpu.cpp. Every pixel composites its tile's depth-sorted list front to back, and
the backward walks it back to front, recovering T_i = T_{i+1} / (1 - alpha_i) from the stored final
transmittance instead of keeping per-pair weights. Within a tile the loop runs over the list and
visits only the pixels of each Gaussian's alpha >= 1/255 ellipse. Tiles are spread over torch's
threads (`torch.set_num_threads`) with OpenMP; results do not depend on the number of threads
(each pair's gradient gets its own row, summed per Gaussian in a fixed order).

Deliberate difference from the torch reference: as in the 3DGS CUDA rasterizer, a pixel stops
before the first Gaussian that would take its transmittance below `t_min` = 1e-4, and that
Gaussian is not added. What is left out is the stopped pixel's remaining transmittance T_final,
which is < 1e-4 / (1 - alpha) <= 0.01 for the stopping Gaussian's alpha (<= 0.99): alphas are lower
than torch's by that much at most, colors and depths differ by at most that times the largest
feature. On the benchmark scenes (10k-50k Gaussians, 128^2-256^2 pixels) the largest difference in
alpha was 8e-4 and the mean 4e-5 to 1e-4. With `t_min=0` the two agree to rounding (pixels still
stop where T would become subnormal, so that the divisions stay exact).

The extension is compiled once with `torch.utils.cpp_extension.load` (about a minute; needs a C++
compiler with OpenMP and ninja) into $GEN3D_CACHE/torch_extensions/<torch version>, by default
~/.cache/gen3d/torch_extensions/<torch version>; its name holds a hash of the source and flags, so
an edited source is rebuilt. When it cannot be built, `cpp_available()` is False and one warning
says why.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
import threading
from pathlib import Path

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from gen3d.ops._projection import tile_grid
from gen3d.ops._raster_torch import TileBins

logger = logging.getLogger(__name__)

T_MIN = 1e-4  # 3DGS early termination: a pixel stops before its transmittance would fall below this
SOURCE = Path(__file__).resolve().parent / "csrc" / "rasterize_cpu.cpp"
# No -march=native (the cache may move to another machine) and no -ffast-math (linked into a shared
# library it can switch the whole process to flush-to-zero); no FMA contraction, so that the forward
# and the backward compute bit-identical alphas and skip the same pairs.
CFLAGS = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-math-errno"]
LDFLAGS = ["-fopenmp"]
FIX = "install a C++ compiler with OpenMP and ninja (e.g. `apt-get install g++` and `pip install ninja`)"



def cache_dir() -> Path:
    """Where the compiled extension lives: $GEN3D_CACHE or ~/.cache/gen3d, then torch_extensions/<torch version>."""
    root = os.environ.get("GEN3D_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "gen3d")
    return Path(root) / "torch_extensions" / torch.__version__


def extension_name(source: Path, prefix: str) -> str:
    """`prefix` and a hash of the source, the flags and the Python version: an edited source rebuilds."""
    digest = hashlib.sha256(source.read_bytes())
    digest.update(" ".join(CFLAGS + LDFLAGS + [sys.version.split()[0]]).encode())
    return f"{prefix}_{digest.hexdigest()[:16]}"


def compile_extension(source: Path, prefix: str, what: str):
    """Compile (or load the cached) extension of one C++ `source`; raises with a one-line reason when it
    cannot. `what` names it in the log line ("rasterizer")."""
    from torch.utils import cpp_extension

    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler found ({compiler!r} is not on PATH)")
    if not cpp_extension.is_ninja_available():
        raise RuntimeError("ninja is not installed (torch builds extensions with it)")
    if not source.is_file():
        raise RuntimeError(f"the kernel source {source} is missing from the installed package")
    name = extension_name(source, prefix)
    build_dir = cache_dir() / name
    build_dir.mkdir(parents=True, exist_ok=True)
    if not any(build_dir.glob(f"{name}*.so")):
        # printed, not logged: library INFO lines are not shown, and the first render waits on this
        print(f"compiling the C++ {what} (once, about 40 s) into {build_dir} ...", file=sys.stderr, flush=True)
    return cpp_extension.load(name, [str(source)], extra_cflags=CFLAGS, extra_ldflags=LDFLAGS,
                              build_directory=str(build_dir), verbose=False)


class CppExtension:
    """One C++ source compiled on first use and cached: `load()` gives the module, or None when it cannot
    be built (`error` says why, and `available()` warns once that `fallback` is used instead)."""

    def __init__(self, source: Path, prefix: str, what: str, fallback: str, build=None):
        self.source, self.prefix, self.what, self.fallback = source, prefix, what, fallback
        self._build = build or (lambda: compile_extension(self.source, self.prefix, self.what))
        self._lock = threading.Lock()
        self.module = None
        self.error: str | None = None  # why it could not be built, once tried
        self._warned = False

    def load(self):
        with self._lock:
            if self.module is None and self.error is None:
                try:
                    self.module = self._build()
                except Exception as exc:  # any failure (no compiler, compile error, bad cache) means: use torch
                    self.error = _short_reason(exc)
            return self.module

    def require(self):
        """The compiled module; raises (with the build error and the fix) when it cannot be built."""
        module = self.load()
        if module is None:
            raise RuntimeError(f"the C++ {self.what} could not be built: {self.error}; {FIX}")
        return module

    def available(self) -> bool:
        available = self.load() is not None
        if not available and not self._warned:
            self._warned = True
            logger.warning("the C++ %s is unavailable (%s); %s is used instead. To enable it, %s.",
                           self.what, self.error, self.fallback, FIX)
        return available


def _short_reason(exc: Exception) -> str:
    """The first compiler error line of a failed build, else the exception's last line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower() and line != lines[0]]
    return (errors[0] if errors else lines[-1] if lines else type(exc).__name__)[:300]


EXTENSION = CppExtension(SOURCE, "gen3d_rasterize_cpu", "rasterizer", "the pure-torch tile rasterizer")


def _extension_name() -> str:
    return extension_name(SOURCE, EXTENSION.prefix)


def load_extension():
    """The compiled module, or None when it cannot be built (`build_error()` says why). Built at most once."""
    return EXTENSION.load()


def build_error() -> str | None:
    """Why the extension could not be built, or None (built, or not tried yet)."""
    return EXTENSION.error


def cpp_available() -> bool:
    """Whether the C++ rasterizer can be used (builds it on first call); warns once when it cannot."""
    return EXTENSION.available()


@torch.no_grad()
def bin_gaussians_cpp(
    means2d: Tensor,  # [C, N, 2]
    conics: Tensor,  # [C, N, 3]
    opacities: Tensor,  # [C, N]
    extents: Tensor,  # [C, N, 2]
    depths: Tensor,  # [C, N]
    visible: Tensor,  # [C, N] bool
    width: int,
    height: int,
    tile_size: int,
) -> TileBins:
    """`bin_gaussians` in C++: the same pairs in the same order (flat_ids, tile_start, tile_count), bit for bit.

    CPU tensors of one floating dtype. The bins have no `chunks` (the C++ composite does not use them), so
    they are for `rasterize_tiles_cpp` only, not for the torch `rasterize_tiles`.
    """
    ext = EXTENSION.require()
    flat_ids, tile_start, tile_count = ext.bin_tiles(means2d.detach(), conics.detach(), opacities.detach(),
                                                     extents.detach(), depths.detach(), visible, width, height,
                                                     tile_size)
    tiles_x, tiles_y = tile_grid(width, height, tile_size)
    return TileBins(flat_ids, tile_start, tile_count, [], tiles_x, tiles_y)


class _TileCompositeCpp(torch.autograd.Function):
    """`_raster_torch._TileComposite` with C++ kernels; see the module docstring."""

    @staticmethod
    def forward(ctx, means2d, conics, opacities, feats, bins: TileBins, width: int, height: int, tile_size: int,
                t_min: float):
        ext = EXTENSION.require()
        tensors = [t.detach().contiguous() for t in (means2d, conics, opacities, feats)]
        geometry = (bins.tiles_x, bins.tiles_y, tile_size, width, height)
        out, t_final, n_contrib = ext.forward(*tensors, bins.flat_ids, bins.tile_start, bins.tile_count,
                                              *geometry, float(t_min))
        ctx.save_for_backward(*tensors, bins.flat_ids, bins.tile_start, bins.tile_count, t_final, n_contrib)
        ctx.geometry = geometry
        ctx.mark_non_differentiable(n_contrib)
        return out, t_final, n_contrib

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, grad_t_final, _grad_n):
        *tensors, flat_ids, tile_start, tile_count, t_final, n_contrib = ctx.saved_tensors
        d_means2d, d_conics, d_opacities, d_feats = EXTENSION.require().backward(
            *tensors, flat_ids, tile_start, tile_count, *ctx.geometry, t_final, n_contrib,
            grad_out.contiguous(), grad_t_final.contiguous(),
        )
        return d_means2d, d_conics, d_opacities, d_feats, None, None, None, None, None


def rasterize_tiles_cpp(
    means2d: Tensor,  # [C, N, 2]
    conics: Tensor,  # [C, N, 3]
    opacities: Tensor,  # [C, N]
    feats: Tensor,  # [C, N, F]
    bins: TileBins,
    width: int,
    height: int,
    tile_size: int,
    *,
    t_min: float | None = None,
) -> tuple[Tensor, Tensor]:
    """`rasterize_tiles` in C++: accumulated features [C, H, W, F] and final transmittance [C, H, W].

    CPU tensors of one floating dtype (float32 or float64). `t_min` is the early-termination
    threshold on transmittance, `T_MIN` (read at call time) if None; 0 disables it up to subnormal T,
    which the parity tests use.
    """
    t_min = T_MIN if t_min is None else t_min
    out, t_final, _ = _TileCompositeCpp.apply(means2d, conics, opacities, feats, bins, width, height, tile_size, t_min)
    return out, t_final
