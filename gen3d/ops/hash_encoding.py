"""Multi-resolution hash encoding [Müller et al. 2022, "Instant Neural Graphics Primitives with a
Multiresolution Hash Encoding"].

A point x in [0, 1]^3 is looked up in L grids of increasing resolution N_0 < ... < N_{L-1}
(Instant-NGP: N_l = floor(N_min b^l), b = exp((ln N_max - ln N_min) / (L - 1)); `grid_resolutions`).
Level l has N_l cells per axis and (N_l + 1)^3 vertices at the integer points of x N_l; each vertex
owns a feature vector of F numbers in that level's table (one row of `tables [L, T, F]`). The
level's output is the trilinear interpolation of the 8 vertices of the cell holding x, and the
encoding is the concatenation over levels, ``[P, L * F]`` (level-major: column l F + f).

Vertex (i, j, k) of level l is row
- ``i + j (N_l + 1) + k (N_l + 1)^2`` when the dense grid fits, ``(N_l + 1)^3 <= T`` (coarse levels:
  no collisions, as in Instant-NGP);
- ``((i * 1) xor (j * 2654435761) xor (k * 805459861)) mod 2^32 mod T`` otherwise, the spatial hash
  of Instant-NGP (products taken modulo 2^32 as its uint32 arithmetic does). Colliding vertices
  share a row; the gradients of the colliders add up, and training sorts out which dominates.

Conventions: points outside [0, 1]^3 are clamped to it; a point on a cell face uses the lower cell
(on the upper boundary the last cell, with weight 1 on its upper vertices). The gradient w.r.t. x
is that of the trilinear weights (the floor is piecewise constant), which is exactly the
Instant-NGP gradient: continuous in value, piecewise in slope; so analytic normals of a field
built on it work and are differentiable again (second derivatives w.r.t. the tables flow, as an
orientation loss on the normals needs).

Backends (same signature, parity-tested against `hash_encode_reference`, forward and backward):

- ``"torch"``: vectorized over levels, points last: one ``[L, 3, P]`` cell computation, the 8
  corner rows of all levels as one int32 ``[L, 8, P]`` tensor (per-axis terms, then two
  broadcast adds/xors), and one autograd.Function (`_Interpolate`) that gathers all L x 8 x P
  rows with one `index_select` from the tables laid out as ``[F, L T]`` and sums the 8 corners
  with their weights; its backward scatters with `index_add_`. Any device and dtype.
- ``"cpp"``: the same math fused in C++/OpenMP (csrc/hash_encoding_cpu.cpp), compiled on first
  use and cached (`gen3d.ops._raster_cpp.CppExtension`, about 40 s once); CPU float32/float64.
  Forward, backward and double backward (``create_graph=True``: a loss on analytic normals) are
  fused loops (levels outer, points inner; table gradients are parallel over levels, so no
  atomics and no dependence on the thread count); third derivatives are not provided.
- ``"auto"``: cpp for CPU float32/float64 when it builds (warns once and uses torch when not),
  else torch.

Measured (benchmarks/bench_hash_encoding.py, 1 thread, a 2-core machine running other jobs, min
of 5 runs interleaved across variants; defaults L = 16, F = 2, T = 2^16, N 16..512; absolute times
vary by ~30% between runs, the ratios less):

    P = 2^16     forward   fwd+bwd (tables)   fwd+bwd (tables and x)   double backward
    reference       -          431 ms                 -                   1313 ms
    torch         53 ms         84 ms               136 ms                 217 ms
    cpp           27 ms         59 ms                78 ms                 163 ms

("double backward": forward, the gradient w.r.t. x with create_graph, then a loss on it back to x
and the tables, as a loss on analytic normals does.) reference / torch = 5x, reference / cpp =
6-8x, torch / cpp = 1.3-2x (at P = 2^14 as well). So "auto" picks cpp on CPU.

How the torch path was chosen (a scratch comparison under the same conditions, P = 2^16):

- The layout matters most. With points first (``[P, L, 8]``) every elementwise op has a broadcast
  inner dimension of 2 or 8, which torch's CPU kernels do not vectorize: the index computation
  alone took ~560 ms. With points last (``[L, 8, P]``, inner loops over P) it is ~25 ms.
- int32 indices: the per-axis products are ~6x faster in int32 than int64 (no AVX2 64-bit multiply),
  and `index_select` takes int32 indices. The int32 path is used whenever it cannot overflow
  (T a power of two, max N_l (T - 1) < 2^31 and L T < 2^31); otherwise the indices are int64.
- The table gradient (backward time on the same indices, 8.4 M rows): `F.embedding_bag` (a fused
  weighted sum, the fastest forward) ~940 ms and no double backward for its per-sample weights;
  `F.embedding` ~390 ms; autograd of advanced indexing (``index_put_(accumulate=True)``) ~200 ms;
  autograd of `index_select` ~140 ms; a custom autograd.Function with `index_add_` ~80 ms, the
  choice. `index_add_` with an int32 index falls into a slow path (~20x slower), so the Function
  keeps int32 indices for the forward and widens them in the backward only (~25 ms; int64 from
  the start costs more in the forward).
- The corner sum as 8 multiply-adds over ``[F, L, P]`` slices (~4 ms) rather than one broadcast
  multiply and a reduction over the corner dimension (~30 ms); and the weight gradient (needed
  only for the gradient w.r.t. x) from a recomputed gather, not a saved ``[F, L, 8, P]`` tensor.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from gen3d.ops._raster_cpp import CppExtension

PRIMES = (1, 2654435761, 805459861)
"""Instant-NGP's spatial-hash multipliers of the x, y and z vertex coordinates."""
BACKENDS = ("auto", "torch", "cpp")
CPP_DTYPES = (torch.float32, torch.float64)
_INT32_MAX = 2**31 - 1


# ---------------------------------------------------------------------------------- resolutions


def grid_resolutions(num_levels: int, base_resolution: int, finest_resolution: int) -> list[int]:
    """Instant-NGP's level resolutions: ``N_l = floor(N_min b^l)``, ``b = exp((ln N_max - ln N_min) / (L - 1))``.

    With one level it is ``[base_resolution]``. A tiny epsilon keeps N_{L-1} = N_max despite rounding.
    """
    if not (isinstance(num_levels, int) and num_levels >= 1):
        raise ValueError(f"grid_resolutions: num_levels must be an int >= 1, got {num_levels!r}")
    if not (isinstance(base_resolution, int) and isinstance(finest_resolution, int)
            and 1 <= base_resolution <= finest_resolution):
        raise ValueError(f"grid_resolutions: need ints 1 <= base_resolution <= finest_resolution, "
                         f"got {base_resolution!r} and {finest_resolution!r}")
    if num_levels == 1:
        return [base_resolution]
    growth = math.exp((math.log(finest_resolution) - math.log(base_resolution)) / (num_levels - 1))
    return [math.floor(base_resolution * growth**level + 1e-6) for level in range(num_levels)]


def dense_levels(resolutions: Sequence[int], table_size: int) -> list[bool]:
    """Per level whether its (N_l + 1)^3 vertices fit in the table (dense indexing, no hashing)."""
    return [(n + 1) ** 3 <= table_size for n in resolutions]


# ---------------------------------------------------------------------------------- public op


def hash_encode(
    x: Tensor,  # [P, 3] in [0, 1] (clamped)
    tables: Tensor,  # [L, T, F]
    resolutions: Sequence[int] | Tensor,  # [L] cells per axis of each level
    backend: str = "auto",
) -> Tensor:  # [P, L * F]
    """Multi-resolution hash encoding of `x` (see the module docstring): ``[P, L * F]``, level-major.

    Differentiable w.r.t. `tables` and `x` (also twice, for losses on analytic normals).
    """
    res = _check_inputs(x, tables, resolutions, backend, "hash_encode")
    backend = _choose_backend(backend, x, tables)
    if backend == "cpp":
        return _HashEncodeCpp.apply(x, tables, torch.tensor(res, dtype=torch.int64))
    return hash_encode_torch(x, tables, res)


def hash_encode_torch(x: Tensor, tables: Tensor, resolutions: Sequence[int]) -> Tensor:  # [P, L * F]
    """The vectorized pure-torch path of `hash_encode` (no input checks; see the module docstring)."""
    L, T, F = tables.shape
    P = x.shape[0]
    idx, frac = _corner_rows(x, resolutions, T)  # [L * 8 * P] int, [L, 3, P]
    flat = tables.permute(2, 0, 1).reshape(F, L * T)  # [F, L T]
    w = _corner_weights(frac).view(L, 8, P)
    out = _Interpolate.apply(flat, w, idx)  # [F, L, P]
    return out.permute(2, 1, 0).reshape(P, L * F)


def index_dtype(resolutions: Sequence[int], table_size: int) -> torch.dtype:
    """int32 when no index can overflow it (see the module docstring), else int64."""
    L, T = len(resolutions), table_size
    dense = dense_levels(resolutions, T)
    hashed_max = max((n for n, d in zip(resolutions, dense) if not d), default=0)
    power_of_two = T & (T - 1) == 0
    fits = L * T <= _INT32_MAX and hashed_max * (T - 1) <= _INT32_MAX and (power_of_two or hashed_max == 0)
    return torch.int32 if fits else torch.int64


def _corner_rows(x: Tensor, resolutions: Sequence[int], T: int) -> tuple[Tensor, Tensor]:
    """Rows of the 8 corners of every level in the flat ``[L T]`` table: ``[L * 8 * P]`` (order
    level, corner (dx, dy, dz) with dx slowest, point), and the in-cell position ``[L, 3, P]`` (differentiable)."""
    L = len(resolutions)
    P = x.shape[0]
    itype = index_dtype(resolutions, T)
    dense = dense_levels(resolutions, T)
    res = torch.tensor(resolutions, dtype=x.dtype, device=x.device)  # [L]
    pos = x.clamp(0.0, 1.0).t()[None] * res[:, None, None]  # [L, 3, P]
    with torch.no_grad():
        cell = torch.minimum(pos.floor(), (res - 1)[:, None, None])  # [L, 3, P] lower vertex
    frac = pos - cell  # [L, 3, P] in [0, 1]

    # Per-axis terms a = c * m (c the lower or upper vertex coordinate); the row is a_x + a_y + a_z on
    # dense levels and a_x ^ a_y ^ a_z on hashed ones.
    with torch.no_grad():
        c = cell.to(itype)  # [L, 3, P]
        if itype == torch.int32:
            # Power-of-two T: (c p mod 2^32) mod T = c (p mod T) mod T, and c (p mod T) fits int32 (checked
            # by `index_dtype`). Dense terms are < T already, so one mask serves all levels.
            mult = [(1, n + 1, (n + 1) ** 2) if d else tuple(p & (T - 1) for p in PRIMES)
                    for n, d in zip(resolutions, dense)]
            m = torch.tensor(mult, dtype=itype, device=x.device)[:, :, None]  # [L, 3, 1]
            lo = c * m
            axes = torch.stack([lo, lo + m], 2)  # [L, 3, 2, P]
            if any(not d for d in dense):  # then T is a power of two (`index_dtype`)
                axes.bitwise_and_(T - 1)
        else:
            mult = [(1, n + 1, (n + 1) ** 2) if d else PRIMES for n, d in zip(resolutions, dense)]
            m = torch.tensor(mult, dtype=itype, device=x.device)[:, :, None]
            lo = c * m
            axes = torch.stack([lo, lo + m], 2)
            hashed = ~torch.tensor(dense, device=x.device)
            axes[hashed] = axes[hashed].bitwise_and_(0xFFFFFFFF)  # uint32 products, as Instant-NGP
        ax, ay, az = axes.unbind(1)  # [L, 2, P] each
        offsets = (torch.arange(L, dtype=itype, device=x.device) * T).view(L, 1, 1)  # first row of each level
        # int32: every term is already reduced mod T (a power of two, or all levels dense), so a row within
        # a level is < T and the level offset, a multiple of T with disjoint bits, can enter through the z
        # term under xor as well as under +. int64: rows are reduced mod T after the xor, then offset.
        fold = itype == torch.int32
        if fold:
            az = az + offsets
        xy = torch.empty(L, 2, 2, P, dtype=itype, device=x.device)
        rows = torch.empty(L, 2, 2, 2, P, dtype=itype, device=x.device)
        for start, stop, is_dense in _runs(dense):
            op = torch.add if is_dense else torch.bitwise_xor
            op(ax[start:stop, :, None], ay[start:stop, None, :], out=xy[start:stop])
            op(xy[start:stop, :, :, None], az[start:stop, None, None, :], out=rows[start:stop])
            if not fold and not is_dense:
                rows[start:stop].remainder_(T)
        if not fold:
            rows += offsets[..., None, None]
    return rows.view(-1), frac


def _runs(flags: Sequence[bool]) -> list[tuple[int, int, bool]]:
    """Maximal runs of equal flags as (start, stop, flag); levels sorted by resolution give at most 2."""
    runs, start = [], 0
    for i in range(1, len(flags) + 1):
        if i == len(flags) or flags[i] != flags[start]:
            runs.append((start, i, flags[start]))
            start = i
    return runs


def _corner_weights(frac: Tensor) -> Tensor:  # frac [L, 3, P] -> [L, 2, 2, 2, P]
    """Trilinear weights of the 8 corners, (1 - f) for the lower and f for the upper vertex per axis."""
    wx, wy, wz = torch.stack([1.0 - frac, frac], 2).unbind(1)  # [L, 2, P] each
    return (wx[:, :, None] * wy[:, None, :])[:, :, :, None] * wz[:, None, None, :]


class _Interpolate(torch.autograd.Function):
    """``out[f, l, p] = sum_k w[l, k, p] table[f, idx[l, k, p]]``: the corner gather and the trilinear sum.

    Forward: one `index_select` of the ``[F, L T]`` table and 8 multiply-adds. Backward: the table
    gradient by `index_add` with an int64 index (the int32 one takes a slow path), and the weight
    gradient (only when asked, e.g. for the gradient w.r.t. x) from a recomputed gather. The backward
    is made of differentiable ops, so double backward (a loss on analytic normals) works.
    """

    @staticmethod
    def forward(ctx, table: Tensor, w: Tensor, idx: Tensor) -> Tensor:  # [F, N], [L, 8, P], [L * 8 * P]
        F, (L, _, P) = table.shape[0], w.shape
        feat = table.index_select(1, idx).view(F, L, 8, P)
        out = w[:, 0] * feat[:, :, 0]  # [F, L, P]
        for k in range(1, 8):
            out.addcmul_(w[:, k], feat[:, :, k])
        ctx.save_for_backward(table, w, idx)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):  # grad [F, L, P]
        table, w, idx = ctx.saved_tensors
        grad = grad.contiguous()  # it arrives as a transposed view of the [P, L F] output's gradient
        grad_table = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_feat = grad[:, :, None, :] * w  # [F, L, 8, P]
            grad_table = grad.new_zeros(table.shape).index_add(1, idx.long(), grad_feat.reshape(table.shape[0], -1))
        if ctx.needs_input_grad[1]:
            F, (L, _, P) = table.shape[0], w.shape
            idx_long = idx.long()
            feat = table.index_select(1, idx_long).view(F, L, 8, P)
            grad_w = feat[0] * grad[0][:, None, :]  # [L, 8, P]
            for f in range(1, F):
                grad_w = torch.addcmul(grad_w, feat[f], grad[f][:, None, :])
        return grad_table, grad_w, None


# ---------------------------------------------------------------------------------- reference


def hash_encode_reference(
    x: Tensor,  # [P, 3] in [0, 1] (clamped)
    tables: Tensor,  # [L, T, F]
    resolutions: Sequence[int] | Tensor,  # [L]
) -> Tensor:  # [P, L * F]
    """The definition of `hash_encode`: a Python loop over levels and corners, int64 indices, plain autograd.

    Slow; for the parity tests and the benchmark.
    """
    res = _check_inputs(x, tables, resolutions, "torch", "hash_encode_reference")
    T = tables.shape[1]
    x = x.clamp(0.0, 1.0)
    outputs = []
    for level, n in enumerate(res):
        pos = x * n  # [P, 3]
        cell = torch.minimum(pos.detach().floor(), torch.full_like(pos, n - 1))
        frac = pos - cell
        cell = cell.long()
        dense = (n + 1) ** 3 <= T
        out = 0.0
        for corner in range(8):
            offset = torch.tensor([(corner >> 2) & 1, (corner >> 1) & 1, corner & 1], device=x.device)
            v = cell + offset  # [P, 3] vertex coordinates
            if dense:
                row = v[:, 0] + v[:, 1] * (n + 1) + v[:, 2] * (n + 1) ** 2
            else:
                h = (v[:, 0] * PRIMES[0]) ^ (v[:, 1] * PRIMES[1]) ^ (v[:, 2] * PRIMES[2])
                row = (h & 0xFFFFFFFF) % T
            weight = torch.where(offset.bool(), frac, 1.0 - frac).prod(-1)  # [P]
            out = out + weight[:, None] * tables[level][row]  # [P, F]
        outputs.append(out)
    return torch.cat(outputs, dim=-1)


# ---------------------------------------------------------------------------------- checks


def _check_inputs(x, tables, resolutions, backend, who: str) -> list[int]:
    """Validate the arguments; returns the resolutions as a list of ints."""
    if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[-1] != 3 or not x.is_floating_point():
        raise ValueError(f"{who}: x must be a float tensor [P, 3], got "
                         f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}"
                         f"{' ' + str(x.dtype) if isinstance(x, Tensor) else ''}")
    if not isinstance(tables, Tensor) or tables.dim() != 3 or not tables.is_floating_point():
        raise ValueError(f"{who}: tables must be a float tensor [L, T, F], got "
                         f"{tuple(tables.shape) if isinstance(tables, Tensor) else type(tables).__name__}")
    if x.dtype != tables.dtype or x.device != tables.device:
        raise ValueError(f"{who}: x and tables must share dtype and device, got {x.dtype} on {x.device} "
                         f"and {tables.dtype} on {tables.device}")
    if isinstance(resolutions, Tensor):
        resolutions = resolutions.tolist()
    res = list(resolutions)
    if len(res) != tables.shape[0] or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in res):
        raise ValueError(f"{who}: resolutions must be {tables.shape[0]} ints >= 1 (one per level of tables "
                         f"{tuple(tables.shape)}), got {resolutions!r}")
    if tables.shape[1] < 1 or tables.shape[2] < 1:
        raise ValueError(f"{who}: tables must have T >= 1 rows and F >= 1 features, got {tuple(tables.shape)}")
    if backend not in BACKENDS:
        raise ValueError(f"{who}: backend must be one of {BACKENDS}, got {backend!r}")
    return res


def _choose_backend(backend: str, x: Tensor, tables: Tensor) -> str:
    cpp_fits = x.device.type == "cpu" and x.dtype in CPP_DTYPES
    if backend == "cpp":
        if not cpp_fits:
            raise ValueError(f"hash_encode: backend='cpp' needs float32 or float64 CPU tensors, got {x.dtype} on {x.device}")
        EXTENSION.require()
        return "cpp"
    if backend == "auto" and cpp_fits and EXTENSION.available():  # builds it on first use; warns once if it cannot
        return "cpp"
    return "torch"


# ---------------------------------------------------------------------------------- C++ backend

SOURCE = Path(__file__).resolve().parent / "csrc" / "hash_encoding_cpu.cpp"
EXTENSION = CppExtension(SOURCE, "gen3d_hash_encoding_cpu", "hash encoding", "the pure-torch hash encoding")


def cpp_available() -> bool:
    """Whether the C++ hash encoding can be used (builds it on first call); warns once when it cannot."""
    return EXTENSION.available()


class _HashEncodeCpp(torch.autograd.Function):
    """`hash_encode` with the fused C++ kernels (csrc/hash_encoding_cpu.cpp). Its backward is itself a
    Function (`_HashEncodeCppBackward`), so a double backward (a loss on analytic normals) runs in C++ too."""

    @staticmethod
    def forward(ctx, x: Tensor, tables: Tensor, res_tensor: Tensor) -> Tensor:  # -> [P, L F]
        ctx.save_for_backward(x, tables, res_tensor)  # the inputs themselves: a double backward reaches them
        return EXTENSION.require().forward(x.detach().contiguous(), tables.detach().contiguous(), res_tensor)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, tables, res_tensor = ctx.saved_tensors
        need_x, need_tables = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_x, grad_tables = _HashEncodeCppBackward.apply(grad.contiguous(), x, tables, res_tensor, need_x, need_tables)
        return (grad_x if need_x else None), (grad_tables if need_tables else None), None


class _HashEncodeCppBackward(torch.autograd.Function):
    """The backward of `_HashEncodeCpp` as a function of (grad, x, tables), with a C++ backward of its own
    (second derivatives; third derivatives are not provided)."""

    @staticmethod
    def forward(ctx, grad, x, tables, res_tensor, need_x: bool, need_tables: bool):  # -> [P, 3], [L, T, F]
        grad, x, tables = grad.contiguous(), x.detach().contiguous(), tables.detach().contiguous()
        ctx.save_for_backward(grad, x, tables, res_tensor)
        grad_tables, grad_x = EXTENSION.require().backward(grad, x, tables, res_tensor, need_tables, need_x)
        return grad_x, grad_tables

    @staticmethod
    @once_differentiable
    def backward(ctx, h_x, h_tables):
        grad, x, tables, res_tensor = ctx.saved_tensors
        empty = x.new_empty(0)
        h_x = empty if h_x is None or h_x.numel() == 0 else h_x.contiguous()
        h_tables = empty if h_tables is None or h_tables.numel() == 0 else h_tables.contiguous()
        need_grad, need_x, need_tables = ctx.needs_input_grad[:3]
        d_grad, d_x, d_tables = EXTENSION.require().double_backward(
            grad, x, tables, res_tensor, h_tables, h_x, need_grad, need_x, need_tables)
        return ((d_grad if need_grad else None), (d_x if need_x else None), (d_tables if need_tables else None),
                None, None, None)
