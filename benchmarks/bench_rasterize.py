"""Speed and memory of the Gaussian rasterizer backends on CPU, against the machine's arithmetic limit, as JSON.

    python benchmarks/bench_rasterize.py --repeats 3        # 10k at 128^2, 50k at 256^2, 200k at 512^2
    python benchmarks/bench_rasterize.py --cases 10000@128 --repeats 1
    python benchmarks/bench_rasterize.py --quick            # 2k Gaussians at 64^2, a smoke test

Scene: N Gaussians uniform in the unit ball, log-uniform scales in [0.01, 0.05], random rotations,
opacities in [0.1, 0.9], one camera at distance 2.7 with a 45 degree vertical field of view.

Backends, each timed forward only (under `torch.no_grad`) and forward + backward (a loss on colors,
alphas and depths, gradients for means, quats, scales, opacities and colors); every timing is the
whole `rasterize_gaussians` call (projection, binning, compositing), min and median of `--repeats`
runs after one warm-up:
- cpp: the compiled C++/OpenMP kernel, 16-px tiles (`cpp`) and 8-px tiles (`cpp_tile8`, what the
  renderer uses on CPU);
- torch: the pure-torch tile reference, 16-px (`torch`) and 8-px (`torch_tile8`) tiles;
- dense: all Gaussian-pixel pairs. When N_visible x H x W exceeds `--dense-max-pairs`, it renders
  the full image from a random subset of the Gaussians and the time is extrapolated linearly in
  visible Gaussians (flagged `extrapolated`; its memory is that of the subset, the dense backend
  works in bounded chunks).

Each (case, backend) runs in a fresh subprocess, so that its peak memory is its own: `peak_mb` is
the peak resident set size during the call minus the resident set size just before it, for the
first call of each mode (forward first, then forward + backward). On Linux the peak (VmHWM) is reset
before each call through /proc/self/clear_refs; elsewhere getrusage's ru_maxrss is used and
`peak_is_upper_bound` is set when the call did not raise the process's earlier peak. Torch's CPU
allocations are invisible to tracemalloc, so RSS is the honest figure.

Gaussian-pixel pairs:
- tile backends: `pairs` = sum over tiles of (Gaussians in the tile's list) x (pixels per tile), i.e.
  every (Gaussian, pixel) of every overlapping tile; cpp and torch share the binning, so their pairs
  are equal at equal tile size. torch's `pairs_padded` adds the padding its chunks also compute.
- `ellipse_pairs`: the pairs with alpha >= 1/255 (pixel centers inside each Gaussian's ellipse),
  the only ones the cpp kernel composites (its row-by-row footprint adds a rounding margin of
  power 1e-3; fewer still where a pixel stops early at T < 1e-4).
- dense: N_visible x H x W.

Arithmetic limit: the floating-point operations of the cpp kernel's per-pair inner loop (FLOPS_PER_PAIR,
counted from csrc/rasterize_cpu.cpp for F = 4 features: RGB + depth) against the machine's practical
peak, a float32 2048 x 2048 `torch.mm` (vectorized FMA code) at 1 and 2 threads. `limit_pairs_per_s`
= peak / flops per pair; each backend's `fraction_of_limit` = its pairs per second over that limit,
counting the pairs it actually computes (ellipse pairs for cpp, tile pairs for torch, all pairs for
dense). The projection and binning are in the measured time but not in the flop count.

gsplat: its pure-torch implementation (`gsplat.cuda._torch_impl`) has the projection and the tile
intersection but its pixel rasterization calls a CUDA kernel, so only those two stages are timed
against ours; gsplat's tile intersection is a Python loop, timed on a subset of Gaussians and
extrapolated linearly.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

from gen3d.cameras import orbit_cameras
from gen3d.ops import _raster_cpp
from gen3d.ops._projection import project_gaussians
from gen3d.ops._raster_torch import bin_gaussians
from gen3d.ops.rasterize import rasterize_gaussians

FULL_CASES = [(10_000, 128), (50_000, 256), (200_000, 512)]
QUICK_CASES = [(2_000, 64)]
# name -> (backend, tile size); the tile size is unused by dense
BACKENDS = {"cpp": ("cpp", 16), "cpp_tile8": ("cpp", 8), "torch": ("torch", 16), "torch_tile8": ("torch", 8),
            "dense": ("dense", 16)}

EXP_FLOPS = 15  # std::exp counted as 15 flops (a polynomial of ~10-20 operations)
# Per visited (Gaussian, pixel) pair, from the inner loops of csrc/rasterize_cpu.cpp with F = 4.
# Comparisons and min count as 1 (they take a floating-point slot), divisions as 1 (though slower).
FORWARD_FLOPS = {
    "pixel center x + 0.5": 1, "dx, dy": 2, "power = -0.5 (a dx^2 + c dy^2) - b dx dy": 9,
    "power < skip_below": 1, "exp": EXP_FLOPS, "raw = o exp": 1, "raw <= 1/255": 1, "alpha = min(raw, 0.99)": 1,
    "t_next = T (1 - alpha)": 2, "t_next < t_stop": 1, "w = alpha T": 1, "acc += w f (4 features)": 8,
}
BACKWARD_FLOPS = {
    "alpha recomputed (as forward, to alpha)": 16 + EXP_FLOPS, "1 - alpha": 1, "T_i = T / (1 - alpha)": 1,
    "w = alpha T_i": 1, "f.g and dL/df += w g (4 features)": 16, "dL/dalpha = T_i f.g - rest / (1 - alpha)": 3,
    "rest += w f.g": 2, "raw > 0.99": 1, "d_power = alpha dL/dalpha": 1, "dL/dmean (2)": 10,
    "dL/dconic (3)": 11, "dL/dopacity = dL/dalpha raw / o": 3,
}
FLOPS_PER_PAIR = {"forward": sum(FORWARD_FLOPS.values()), "backward": sum(BACKWARD_FLOPS.values())}
FLOPS_PER_PAIR["forward_backward"] = FLOPS_PER_PAIR["forward"] + FLOPS_PER_PAIR["backward"]


def make_scene(n: int, size: int, seed: int = 0):
    """Random Gaussians in the unit ball and one camera looking at them; leaves require grad."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.nn.functional.normalize(torch.randn(n, 3, generator=g), dim=-1)
    means = dirs * torch.rand(n, 1, generator=g) ** (1 / 3)
    scales = torch.exp(torch.empty(n, 3).uniform_(math.log(0.01), math.log(0.05), generator=g))
    gauss = {
        "means": means, "quats": torch.randn(n, 4, generator=g), "scales": scales,
        "opacities": 0.1 + 0.8 * torch.rand(n, generator=g), "colors": torch.rand(n, 3, generator=g),
    }
    for t in gauss.values():
        t.requires_grad_(True)
    cams = orbit_cameras(1, elevation=15.0, distance=2.7, fovy=45.0, width=size, height=size)
    return gauss, cams.viewmats, cams.K


def subset_scene(gauss: dict, keep: int) -> dict:
    """`keep` Gaussians drawn at random (fixed seed), as new leaves requiring grad."""
    n = gauss["means"].shape[0]
    ids = torch.randperm(n, generator=torch.Generator().manual_seed(1))[:keep]
    return {k: v.detach()[ids].requires_grad_(True) for k, v in gauss.items()}


def project(gauss, viewmats, Ks, size):
    with torch.no_grad():
        return project_gaussians(gauss["means"], gauss["quats"], gauss["scales"], gauss["opacities"], viewmats, Ks,
                                 size, size, 0.01, 1e10, 0.3)


def _time(fn, repeats: int, warmup: bool = True) -> dict:
    if warmup:
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return {"min": min(times), "median": statistics.median(times), "all": times}


def _fwd_bwd(gauss, viewmats, Ks, width, height, backend, tile_size=16):
    def run():
        for t in gauss.values():
            t.grad = None
        out = rasterize_gaussians(**gauss, viewmats=viewmats, Ks=Ks, width=width, height=height,
                                  backend=backend, tile_size=tile_size)
        (out.colors.sum() + out.alphas.sum() + 0.1 * out.depths.sum()).backward()
    return run


def _fwd(gauss, viewmats, Ks, width, height, backend, tile_size=16):
    def run():
        with torch.no_grad():
            rasterize_gaussians(**gauss, viewmats=viewmats, Ks=Ks, width=width, height=height,
                                backend=backend, tile_size=tile_size)
    return run


# ---- one (case, backend) in a fresh process -------------------------------------------------------

def _status_mb(key: str) -> float | None:
    """A size line of /proc/self/status (VmRSS, VmHWM) in MB, or None without procfs."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _peak_mb() -> float:
    """Peak RSS of this process since the last reset (VmHWM), else getrusage's ru_maxrss."""
    hwm = _status_mb("VmHWM")
    if hwm is not None:
        return hwm
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0). ru_maxrss cannot be reset, and in a child it
    starts at the parent's peak (exec records the forked image's), hence VmHWM where there is one."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _measure(fn, repeats: int) -> tuple[dict, float, bool]:
    """Times of `fn` and the peak RSS increase of its first call (which doubles as the warm-up).

    The increase is an upper bound (flagged) when the peak could not be reset and the call did not
    exceed the earlier peak."""
    reset = _reset_peak()
    before = _status_mb("VmRSS") or _peak_mb()
    peak_before = _peak_mb()
    fn()
    peak_after = _peak_mb()
    return _time(fn, repeats, warmup=False), round(peak_after - before, 1), not reset and peak_after <= peak_before


def run_worker(spec: dict) -> dict:
    """Time and measure one backend on one case; `spec` comes from `measure_in_subprocess`."""
    torch.set_num_threads(spec["threads"])
    backend, tile_size, size = spec["backend"], spec["tile_size"], spec["size"]
    # Warm up lazy state (thread pools, the extension's .so) on a tiny scene before measuring memory.
    tiny, tiny_v, tiny_k = make_scene(16, 16)
    _fwd_bwd(tiny, tiny_v, tiny_k, 16, 16, backend, tile_size)()
    gauss, viewmats, Ks = make_scene(spec["n"], size)
    if spec.get("keep") is not None:
        gauss = subset_scene(gauss, spec["keep"])
    visible = int(project(gauss, viewmats, Ks, size).visible.sum())
    fwd, fwd_peak, fwd_bound = _measure(_fwd(gauss, viewmats, Ks, size, size, backend, tile_size), spec["repeats"])
    full, full_peak, full_bound = _measure(_fwd_bwd(gauss, viewmats, Ks, size, size, backend, tile_size),
                                           spec["repeats"])
    return {"visible_gaussians": visible, "fwd_s": fwd, "fwd_bwd_s": full,
            "peak_mb": {"fwd": fwd_peak, "fwd_bwd": full_peak},
            "peak_is_upper_bound": {"fwd": fwd_bound, "fwd_bwd": full_bound}}


def measure_in_subprocess(spec: dict) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1][:300]}
    return json.loads(done.stdout)


# ---- pairs and the arithmetic limit -------------------------------------------------------------

@torch.no_grad()
def count_ellipse_pairs(proj, opacities, width: int, height: int, chunk: int = 4096) -> int:
    """Pixels whose center lies in a visible Gaussian's alpha >= 1/255 ellipse, summed over Gaussians.

    The ellipse is q = d^T conic d <= 2 ln(255 o); it spans rows |dy| <= sqrt(reach a / det) and, in
    a row, dx in (-b dy -+ sqrt(a reach - det dy^2)) / a (as `Footprint` in csrc/rasterize_cpu.cpp).
    Counted row by row in float64 for the first camera. Each tile list holds exactly the tiles the
    ellipse reaches, so these are the tile pairs the cpp kernel composites.
    """
    keep = proj.visible[0]
    mean = proj.means2d[0, keep].double()  # [V, 2]
    a, b, c = proj.conics[0, keep].double().unbind(-1)
    reach = 2.0 * torch.log(255.0 * opacities.detach()[keep].double())
    det = a * c - b * b
    half = torch.sqrt(reach * a / det)
    y_lo = torch.ceil(mean[:, 1] - half - 0.5).clamp(min=0)
    y_hi = torch.floor(mean[:, 1] + half - 0.5).clamp(max=height - 1)
    rows = (y_hi - y_lo + 1).clamp(min=0)
    order = torch.argsort(rows)  # chunks of similar row counts pad little
    total = 0
    for start in range(0, order.shape[0], chunk):
        ids = order[start:start + chunk]
        k = int(rows[ids].max())
        if k == 0:
            continue
        y = y_lo[ids, None] + torch.arange(k, dtype=torch.float64)  # [n, k]
        dy = y + 0.5 - mean[ids, 1:2]
        s = torch.sqrt((a[ids, None] * reach[ids, None] - det[ids, None] * dy * dy).clamp(min=0.0))
        x_lo = torch.ceil(mean[ids, 0:1] + (-b[ids, None] * dy - s) / a[ids, None] - 0.5).clamp(min=0)
        x_hi = torch.floor(mean[ids, 0:1] + (-b[ids, None] * dy + s) / a[ids, None] - 0.5).clamp(max=width - 1)
        total += int(((x_hi - x_lo + 1).clamp(min=0) * (y <= y_hi[ids, None])).sum())
    return total


def matmul_peak_flops(threads: list[int], n: int = 2048, repeats: int = 3) -> dict:
    """Practical float32 peak: 2 n^3 flops of an n x n `torch.mm` over its best time, per thread count."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    previous, peaks = torch.get_num_threads(), {}
    for t in threads:
        torch.set_num_threads(t)
        peaks[str(t)] = 2 * n**3 / _time(lambda: torch.mm(a, b), repeats)["min"]
    torch.set_num_threads(previous)
    return peaks


def arithmetic_limit(threads: int, repeats: int) -> dict:
    counts = sorted({1, 2, threads})
    peaks = matmul_peak_flops(counts, repeats=repeats)
    peak = peaks[str(threads)]
    return {
        "flops_per_pair": FLOPS_PER_PAIR, "exp_counted_as_flops": EXP_FLOPS,
        "breakdown": {"forward": FORWARD_FLOPS, "backward": BACKWARD_FLOPS},
        "peak_flops_by_threads": peaks, "peak_flops": peak, "threads": threads,
        "limit_pairs_per_s": {"fwd": peak / FLOPS_PER_PAIR["forward"],
                              "fwd_bwd": peak / FLOPS_PER_PAIR["forward_backward"]},
        "method": "float32 2048x2048 torch.mm (2 n^3 flops, best of the repeats) as the peak of vectorized FMA "
                  "code; flops per visited pair counted from the cpp kernel's inner loops for 4 features",
    }


# ---- one case -----------------------------------------------------------------------------------

def backend_entry(worker: dict, pairs: int, extra: dict, scale: float | None = None) -> dict:
    """A backend's report; `scale` extrapolates the dense times measured on a subset to all Gaussians."""
    if "error" in worker:
        return {"error": worker["error"], **extra}
    fwd, full = worker["fwd_s"], worker["fwd_bwd_s"]
    if scale is not None:
        fwd, full = ({k: v * scale for k, v in t.items() if k != "all"} for t in (fwd, full))
    entry = {**extra, "pairs": pairs, "fwd_s": fwd, "fwd_bwd_s": full,
             "pairs_per_s": pairs / full["min"], "fwd_pairs_per_s": pairs / fwd["min"],
             "peak_mb": worker["peak_mb"], "peak_is_upper_bound": worker["peak_is_upper_bound"]}
    if "ellipse_pairs" in extra:
        entry["ellipse_pairs_per_s"] = extra["ellipse_pairs"] / full["min"]
        entry["fwd_ellipse_pairs_per_s"] = extra["ellipse_pairs"] / fwd["min"]
    if scale is not None:
        entry.update(measured_fwd_s=worker["fwd_s"], measured_fwd_bwd_s=worker["fwd_bwd_s"])
    return entry


def run_case(n: int, size: int, args, limit: dict) -> dict:
    gauss, viewmats, Ks = make_scene(n, size)
    proj = project(gauss, viewmats, Ks, size)
    visible = int(proj.visible.sum())
    ellipse = count_ellipse_pairs(proj, gauss["opacities"], size, size)
    case = {"n_gaussians": n, "width": size, "height": size, "visible_gaussians": visible, "ellipse_pairs": ellipse}
    spec = {"n": n, "size": size, "repeats": args.repeats, "threads": args.threads}
    for name, (backend, tile_size) in BACKENDS.items():
        if backend == "cpp" and not args.cpp_available:
            case[name] = {"available": False, "reason": _raster_cpp.build_error()}
            continue
        if backend == "dense":
            keep = min(n, max(1, int(args.dense_max_pairs) // (size * size)))
            worker = measure_in_subprocess({**spec, "backend": backend, "tile_size": tile_size,
                                            "keep": keep if keep < n else None})
            scale = visible / worker["visible_gaussians"] if keep < n and "error" not in worker else None
            extra = {"extrapolated": keep < n, "measured_gaussians": keep,
                     "measured_visible_gaussians": worker.get("visible_gaussians")}
            case[name] = backend_entry(worker, visible * size * size, extra, scale)
            continue
        bins = bin_gaussians(proj.means2d, proj.conics, gauss["opacities"].detach().expand(1, -1), proj.extents,
                             proj.depths, proj.visible, size, size, tile_size)
        pixels = tile_size * tile_size
        extra = {"tile_size": tile_size, "tile_gaussian_pairs": bins.num_pairs}
        if backend == "torch":
            extra["pairs_padded"] = sum(len(ids) * m for ids, m in bins.chunks) * pixels
        else:
            extra["ellipse_pairs"] = ellipse
            extra["ellipse_fraction_of_pairs"] = ellipse / max(1, bins.num_pairs * pixels)
        worker = measure_in_subprocess({**spec, "backend": backend, "tile_size": tile_size})
        case[name] = backend_entry(worker, bins.num_pairs * pixels, extra)
    case.update(_ratios(case))
    case["fraction_of_limit"] = _fractions(case, limit)
    case["gsplat_torch_impl"] = bench_gsplat_torch_impl(gauss, viewmats, Ks, size, args.repeats,
                                                        50 if args.quick else args.gsplat_subset)
    return case


def _seconds(case: dict, name: str, mode: str) -> float | None:
    entry = case.get(name, {})
    return entry[mode]["min"] if mode in entry else None


def _ratios(case: dict) -> dict:
    """Time ratios (min seconds; below 1 the first is faster), forward and forward + backward."""
    pairs = [("cpp", "torch"), ("cpp_tile8", "torch_tile8"), ("cpp", "dense"), ("cpp_tile8", "dense"),
             ("torch", "dense"), ("torch_tile8", "dense")]
    ratios = {}
    for mode in ("fwd_s", "fwd_bwd_s"):
        for a, b in pairs:
            ta, tb = _seconds(case, a, mode), _seconds(case, b, mode)
            ratios.setdefault(mode[:-2], {})[f"{a}_over_{b}"] = ta / tb if ta and tb else None
    # the names the README's earlier table uses (forward + backward)
    return {"ratios": ratios, "ratio_torch_over_dense": ratios["fwd_bwd"]["torch_over_dense"],
            "ratio_torch_tile8_over_dense": ratios["fwd_bwd"]["torch_tile8_over_dense"]}


def _fractions(case: dict, limit: dict) -> dict:
    """Achieved pairs per second over the arithmetic limit, counting the pairs each backend computes."""
    out = {}
    for name in BACKENDS:
        entry = case.get(name, {})
        if "fwd_s" not in entry:
            continue
        work = entry.get("ellipse_pairs", entry["pairs"])
        out[name] = {mode: work / entry[f"{mode}_s"]["min"] / limit["limit_pairs_per_s"][mode]
                     for mode in ("fwd", "fwd_bwd")}
    return out


def bench_gsplat_torch_impl(gauss, viewmats, Ks, size, repeats, subset: int) -> dict:
    """gsplat's pure-torch projection and tile intersection versus ours (the stages that run on CPU)."""
    try:
        import gsplat
        from gsplat.cuda._torch_impl import (
            _fully_fused_projection,
            _isect_tiles,
            _quat_scale_to_covar_preci,
        )
    except ImportError as exc:
        return {"available": False, "reason": f"gsplat's pure-torch implementation does not import: {exc}"}
    g = gauss

    def gsplat_projection():
        covars, _ = _quat_scale_to_covar_preci(g["quats"], g["scales"], True, False, triu=False)
        return _fully_fused_projection(g["means"], covars, viewmats, Ks, size, size)

    def our_projection():
        return project_gaussians(g["means"], g["quats"], g["scales"], g["opacities"], viewmats, Ks, size, size, 0.01, 1e10, 0.3)

    def gsplat_fwd_bwd():
        _, means2d, depths, conics, _ = gsplat_projection()
        (means2d.sum() + conics.sum() + depths.sum()).backward()

    def our_fwd_bwd():
        p = our_projection()
        (p.means2d.sum() + p.conics.sum() + p.depths.sum()).backward()

    t_gs, t_ours = _time(gsplat_fwd_bwd, repeats), _time(our_fwd_bwd, repeats)
    with torch.no_grad():
        radii, means2d, depths, _, _ = gsplat_projection()
        p = our_projection()
        tiles = math.ceil(size / 16)
        n = min(subset, means2d.shape[1])
        start = time.perf_counter()
        _, isect_ids, _ = _isect_tiles(means2d[:, :n], radii[:, :n], depths[:, :n], 16, tiles, tiles)
        t_isect = (time.perf_counter() - start) * means2d.shape[1] / n
    t_bin = _time(lambda: bin_gaussians(p.means2d.detach(), p.conics.detach(), g["opacities"].detach().expand(1, -1),
                                        p.extents, p.depths.detach(), p.visible, size, size, 16), repeats)
    return {
        "available": True, "version": gsplat.__version__,
        "projection_fwd_bwd_s": {"gsplat": t_gs, "ours": t_ours, "ratio_ours_over_gsplat": t_ours["min"] / t_gs["min"]},
        "tile_intersection_s": {
            "gsplat": t_isect, "gsplat_extrapolated_from_gaussians": n, "ours": t_bin,
            "ratio_ours_over_gsplat": t_bin["min"] / t_isect,
            "gsplat_pairs_in_subset": int(isect_ids.shape[0]),
        },
        "rasterize_to_pixels": "not timed: gsplat's torch _rasterize_to_pixels calls the CUDA kernel "
                               "rasterize_to_indices_in_range (and needs nerfacc), so it cannot run on CPU",
    }


def _parse_case(text: str) -> tuple[int, int]:
    try:
        n, size = text.lower().split("@")
        return int(n), int(size)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a case is N@SIZE, e.g. 10000@128; got {text!r}") from None


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (after one warm-up)")
    parser.add_argument("--quick", action="store_true", help="one tiny case, 1 repeat: a smoke test")
    parser.add_argument("--cases", nargs="*", type=_parse_case, help="N@SIZE cases instead of the default three")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the cpp kernel follows them)")
    parser.add_argument("--dense-max-pairs", type=float, default=2e8, help="above this the dense time is extrapolated")
    parser.add_argument("--gsplat-subset", type=int, default=2000, help="Gaussians fed to gsplat's Python tile loop")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: one (case, backend) in this process
    args = parser.parse_args(argv)
    if args.worker:
        result = run_worker(json.loads(args.worker))
        print(json.dumps(result))
        return result
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    if args.quick:
        args.repeats = 1
    cases = args.cases or (QUICK_CASES if args.quick else FULL_CASES)
    start = time.perf_counter()
    args.cpp_available = _raster_cpp.load_extension() is not None  # compiled here once, not in the workers
    cpp_build_s = time.perf_counter() - start
    limit = arithmetic_limit(args.threads, args.repeats)
    report = {
        "benchmark": "rasterize_gaussians forward and forward+backward, CPU",
        "torch": torch.__version__, "threads": args.threads, "repeats": args.repeats,
        "load_average_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "cpp_available": args.cpp_available, "cpp_build_or_load_s": cpp_build_s,
        "pairs_definition": {
            "tile backends": "sum over tiles of list length x tile pixels (Gaussian-pixel pairs of overlapping tiles)",
            "ellipse_pairs": "pairs with alpha >= 1/255, the ones the cpp kernel visits",
            "dense": "visible Gaussians x H x W",
        },
        "ratios": "first / second min time (below 1 means the first is faster)",
        "peak_mb": "peak RSS increase during the first call, in a fresh process per (case, backend)",
        "arithmetic_limit": limit,
        "cases": [run_case(n, size, args, limit) for n, size in cases],
    }
    torch.set_num_threads(previous_threads)
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
