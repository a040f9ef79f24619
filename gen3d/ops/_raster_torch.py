"""The reference tile rasterizer in pure torch: binning plus a compositing op with a hand-written backward.

Forward [Kerbl et al. 2023, Sec. 6]: the image is cut into tile_size x tile_size tiles; every visible
Gaussian is paired with the tiles it can reach (`bin_gaussians`: tiles of its screen box, refined per
tile row by the exact extent of its alpha >= 1/255 ellipse, so no pair that matters is missed and
few that don't are kept); pairs are sorted by tile, then depth. Each tile then composites its list
front to back for all its pixels at once:

    alpha_i = min(0.99, o_i exp(q_i)),  q_i = -(p - mu_i)^T Sigma2d_i^-1 (p - mu_i) / 2,  0 if < 1/255
    T_i = prod_{j<i} (1 - alpha_j),     w_i = alpha_i T_i,   out = sum_i w_i f_i,   T_final = prod_i (1 - alpha_i)

with f_i = (color_i, depth_i). Tiles are processed in chunks of similar list length, padded to the
longest list of the chunk, as dense [tiles, pixels, list] tensors.

Speed notes (2-core CPU): q + log(o) is a quadratic polynomial in the tile-local pixel position, so
all pairs of a chunk are one matmul [pixels, 6] @ [tiles, 6, list]; the list dimension is the last one
so cumprod and cumsum run contiguously; the forward keeps its weights for the backward when they fit
in SAVE_BYTES and the backward recomputes them per chunk otherwise; sums over pixels are matmuls.

Backward (the 3DGS derivation, vectorized): with g = dL/dout and g_T = dL/dT_final per pixel,

    dL/df_i = w_i g
    dL/dalpha_i = T_i (f_i . g) - (sum_{j>i} w_j (f_j . g) + T_final g_T) / (1 - alpha_i)

and dalpha/dq = alpha (0 where clamped or skipped), then the chain rule to the 6 coefficients and on to
(mean2d, conic, opacity).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from gen3d.ops._projection import ALPHA_MAX, ALPHA_MIN, tile_grid

CHUNK_ELEMENTS = 1 << 20  # pixels x list entries per chunk: keeps the working set in cache
SAVE_BYTES = 1 << 29  # keep forward weights for the backward when they fit in this; else recompute them


@dataclass
class TileBins:
    """(tile, Gaussian) pairs sorted by tile then depth, and the chunks of tiles to process together."""

    flat_ids: Tensor  # [M] int64 index c * N + n of each pair's Gaussian, sorted by (tile, depth)
    tile_start: Tensor  # [C * T] first pair of each tile
    tile_count: Tensor  # [C * T] pairs per tile
    chunks: list[tuple[Tensor, int]]  # (tile ids [B], longest list L) per chunk
    tiles_x: int
    tiles_y: int

    @property
    def num_pairs(self) -> int:
        return int(self.flat_ids.shape[0])


@torch.no_grad()
def bin_gaussians(
    means2d: Tensor,  # [C, N, 2]
    conics: Tensor,  # [C, N, 3]
    opacities: Tensor,  # [C, N]
    extents: Tensor,  # [C, N, 2]
    depths: Tensor,  # [C, N]
    visible: Tensor,  # [C, N] bool
    width: int,
    height: int,
    tile_size: int,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> TileBins:
    """Pair every visible Gaussian with the tiles it can reach, sorted by (camera, tile, depth).

    A tile is paired when the Gaussian's alpha >= 1/255 ellipse meets the rectangle of the tile's
    pixel centers: for each tile row of the Gaussian's screen box, the x-range of the ellipse within
    that row is computed in closed form (`_ellipse_row_span`) and the tiles it meets are taken. This
    refines the 3DGS box test and drops only pairs that cannot contribute, so results are exact.
    """
    C, N = depths.shape
    tiles_x, tiles_y = tile_grid(width, height, tile_size)
    tiles_per_cam = tiles_x * tiles_y
    device = depths.device

    # Visible Gaussians by camera, then front to back; stable, so equal depths keep index order (as in C++).
    order = torch.argsort(torch.where(visible, depths, torch.inf), dim=-1, stable=True)  # [C, N]
    flat = (order + torch.arange(C, device=device)[:, None] * N).reshape(-1)
    flat = flat[visible.reshape(-1).index_select(0, flat)]  # [V] ids c * N + n
    cam = torch.div(flat, N, rounding_mode="floor")
    reach = 2.0 * torch.log(opacities.reshape(-1).index_select(0, flat) / ALPHA_MIN)  # alpha >= 1/255 <=> q <= reach
    mean = means2d.reshape(-1, 2).index_select(0, flat)  # [V, 2]
    box = extents.reshape(-1, 2).index_select(0, flat)
    y0 = torch.floor((mean[:, 1] - box[:, 1]) / tile_size).long().clamp_(min=0)  # [V] tile rows of the box
    y1 = torch.floor((mean[:, 1] + box[:, 1]) / tile_size).long().clamp_(max=tiles_y - 1)

    # Level 1: one entry per (Gaussian, tile row), with the tile columns its ellipse reaches in that row.
    rows_per = y1 - y0 + 1  # [V] >= 1: visible boxes overlap the image
    rank = torch.repeat_interleave(torch.arange(flat.shape[0], device=device), rows_per)  # [R]
    row = torch.arange(rank.shape[0], device=device) + (y0 - torch.cumsum(rows_per, 0) + rows_per).index_select(0, rank)
    x_lo, x_hi = _ellipse_row_span(
        mean.index_select(0, rank), conics.reshape(-1, 3).index_select(0, flat).index_select(0, rank),
        reach.index_select(0, rank), row, tile_size,
    )
    # Tile columns whose pixel centers meet [x_lo, x_hi] (clamped as floats: empty rows carry infinities).
    tx0 = torch.ceil((x_lo + 0.5) / tile_size - 1).clamp_(0, tiles_x).long()
    tx1 = torch.floor((x_hi - 0.5) / tile_size).clamp_(-1, tiles_x - 1).long()
    count = (tx1 - tx0 + 1).clamp_(min=0)  # [R]

    # Level 2: one entry per (Gaussian, tile).
    entry = torch.repeat_interleave(torch.arange(rank.shape[0], device=device), count)  # [M]
    tx = torch.arange(entry.shape[0], device=device) + (tx0 - torch.cumsum(count, 0) + count).index_select(0, entry)
    src = rank.index_select(0, entry)
    tile_ids = cam.index_select(0, src) * tiles_per_cam + row.index_select(0, entry) * tiles_x + tx
    # src is the rank in (camera, depth) order, so one sort on (tile, rank) orders each tile by depth.
    key, perm = torch.sort(tile_ids * flat.shape[0] + src)
    tile_ids = torch.div(key, flat.shape[0], rounding_mode="floor")
    flat_ids = flat.index_select(0, src.index_select(0, perm))

    tile_count = torch.bincount(tile_ids, minlength=C * tiles_per_cam)
    tile_start = torch.cumsum(tile_count, 0) - tile_count

    # Chunks of tiles with similar list lengths, so that padding to the longest list wastes little.
    pixels = tile_size * tile_size
    by_count = torch.argsort(tile_count)
    sorted_counts = tile_count[by_count].tolist()
    chunks, begin = [], next((i for i, n in enumerate(sorted_counts) if n > 0), len(sorted_counts))
    while begin < len(sorted_counts):
        end = begin + 1
        while end < len(sorted_counts) and (end + 1 - begin) * sorted_counts[end] * pixels <= chunk_elements:
            end += 1
        chunks.append((by_count[begin:end], sorted_counts[end - 1]))
        begin = end
    return TileBins(flat_ids, tile_start, tile_count, chunks, tiles_x, tiles_y)


def _ellipse_row_span(mean: Tensor, conic: Tensor, reach: Tensor, row: Tensor, tile_size: int) -> tuple[Tensor, Tensor]:
    """[R] x-range of the ellipse q = d^T conic d <= reach within the pixel-center rows of tile row `row`.

    For a fixed offset dy the ellipse spans dx in -b dy / a -+ sqrt(a reach - det dy^2) / a (det = ac - b^2).
    Its right edge is concave in dy, so its maximum over the rows' dy interval is at the ellipse's
    rightmost point dy* = -b sqrt(reach / (c det)) clamped to the interval (mirror for the left edge).
    Rows the ellipse does not reach get an empty range (x_lo > x_hi).
    """
    mx, my = mean.unbind(-1)  # [R]
    a, b, c = conic.unbind(-1)
    reach = reach * (1 + 1e-4) + 1e-4  # a hair of slack against rounding: never drop a reachable pixel
    det = a * c - b * b
    dy_max = torch.sqrt(reach * a / det)  # vertical half-extent of the ellipse
    lo = (row * tile_size + 0.5 - my).clamp(min=-dy_max)  # dy interval of the tile row's pixel centers
    hi = (row * tile_size + tile_size - 0.5 - my).clamp(max=dy_max)
    dy_right = -b * torch.sqrt(reach / (c * det))

    def edge(dy: Tensor, sign: float) -> Tensor:  # x of the ellipse's right (+1) or left (-1) edge at dy
        return mx - b * dy / a + sign * torch.sqrt((a * reach - det * dy * dy).clamp(min=0)) / a

    x_hi = edge(torch.minimum(torch.maximum(dy_right, lo), hi), 1.0)
    x_lo = edge(torch.minimum(torch.maximum(-dy_right, lo), hi), -1.0)
    empty = lo > hi
    return x_lo.masked_fill(empty, float("inf")), x_hi.masked_fill(empty, -float("inf"))


def _pixel_basis(tile_size: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """[P, 6] monomials (x^2, xy, y^2, x, y, 1) of pixel centers relative to the tile center."""
    r = torch.arange(tile_size, dtype=dtype, device=device) + 0.5 - 0.5 * tile_size
    y, x = torch.meshgrid(r, r, indexing="ij")
    x, y = x.reshape(-1), y.reshape(-1)
    return torch.stack([x * x, x * y, y * y, x, y, torch.ones_like(x)], dim=-1)


def _tile_centers(tile_ids: Tensor, bins: TileBins, tile_size: int, dtype: torch.dtype) -> Tensor:
    """[B, 2] pixel coordinates of the centers of global tile ids."""
    local = tile_ids % (bins.tiles_x * bins.tiles_y)
    xy = torch.stack([local % bins.tiles_x, local // bins.tiles_x], dim=-1)
    return (xy.to(dtype) + 0.5) * tile_size


def _gather_pairs(tile_ids: Tensor, length: int, bins: TileBins, dummy: int) -> Tensor:
    """[B, L] flat Gaussian ids of the chunk's lists, padded with `dummy` (an invisible Gaussian)."""
    steps = torch.arange(length, device=tile_ids.device)
    idx = bins.tile_start[tile_ids, None] + steps  # [B, L]
    valid = steps < bins.tile_count[tile_ids, None]
    return torch.where(valid, bins.flat_ids[idx.clamp(max=max(bins.num_pairs - 1, 0))], dummy)


def _coefficients(mean: Tensor, conic: Tensor, log_opacity: Tensor) -> Tensor:
    """[B, 6, L] coefficients of q + log(o) in the monomials of `_pixel_basis`; mean is tile-local."""
    a, b, c = conic.unbind(-1)  # [B, L]
    mx, my = mean.unbind(-1)
    bx, by = a * mx + b * my, b * mx + c * my
    const = -0.5 * (mx * bx + my * by) + log_opacity
    return torch.stack([-0.5 * a, -b, -0.5 * c, bx, by, const], dim=1)


def _composite_chunk(basis: Tensor, coefs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Weights alpha_i T_i, odds alpha_i / (1 - alpha_i), and T_final [B, P, 1] of one chunk."""
    o_g = torch.matmul(basis, coefs).exp_()  # [B, P, L] o exp(q)
    alpha = torch.nn.functional.threshold(o_g, ALPHA_MIN, 0.0).clamp_max_(ALPHA_MAX)
    one_minus = 1.0 - alpha  # >= 0.01
    odds = alpha / one_minus
    t_after = torch.cumprod(one_minus, dim=-1)  # T_{i+1}
    return t_after * odds, odds, t_after[..., -1:]


def _to_tiles(image: Tensor, bins: TileBins, tile_size: int) -> Tensor:
    """[C, H, W, K] -> [C * T, P, K], zero-padded at the right and bottom borders."""
    C, H, W, K = image.shape
    ts = tile_size
    padded = image.new_zeros(C, bins.tiles_y * ts, bins.tiles_x * ts, K)
    padded[:, :H, :W] = image
    tiles = padded.reshape(C, bins.tiles_y, ts, bins.tiles_x, ts, K).permute(0, 1, 3, 2, 4, 5)
    return tiles.reshape(C * bins.tiles_y * bins.tiles_x, ts * ts, K)


def _from_tiles(tiles: Tensor, bins: TileBins, tile_size: int, C: int, H: int, W: int) -> Tensor:
    """[C * T, P, K] -> [C, H, W, K] (inverse of `_to_tiles`, cropping the padding)."""
    ts, K = tile_size, tiles.shape[-1]
    image = tiles.reshape(C, bins.tiles_y, bins.tiles_x, ts, ts, K).permute(0, 1, 3, 2, 4, 5)
    return image.reshape(C, bins.tiles_y * ts, bins.tiles_x * ts, K)[:, :H, :W]


class _TileComposite(torch.autograd.Function):
    """Per-pixel front-to-back compositing over the tile lists of `bins`; see the module docstring."""

    @staticmethod
    def forward(ctx, means2d, conics, opacities, feats, bins: TileBins, tile_size: int, width: int, height: int):
        # means2d [C, N, 2], conics [C, N, 3], opacities [C, N], feats [C, N, F] -> [C, H, W, F], [C, H, W]
        C, _, F = feats.shape
        table = _pair_table(means2d, conics, opacities, feats)
        basis = _pixel_basis(tile_size, feats.dtype, feats.device)  # [P, 6]
        out = feats.new_zeros(C * bins.tiles_x * bins.tiles_y, tile_size * tile_size, F)
        t_final = feats.new_ones(C * bins.tiles_x * bins.tiles_y, tile_size * tile_size, 1)
        padded = sum(len(tile_ids) * length for tile_ids, length in bins.chunks) * tile_size * tile_size
        ctx.saved = [] if 2 * padded * feats.element_size() <= SAVE_BYTES else None
        for tile_ids, length in bins.chunks:
            ids, _, coefs = _chunk_inputs(table, tile_ids, length, bins, tile_size)
            weights, odds, t_last = _composite_chunk(basis, coefs)
            out[tile_ids] = weights @ table[ids, 6:]  # [B, P, F]
            t_final[tile_ids] = t_last
            if ctx.saved is not None:
                ctx.saved.append((weights, odds, t_last))
        ctx.save_for_backward(means2d, conics, opacities, feats)
        ctx.bins, ctx.tile_size = bins, tile_size
        return _from_tiles(out, bins, tile_size, C, height, width), _from_tiles(t_final, bins, tile_size, C, height, width)[..., 0]

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, grad_t_final):
        means2d, conics, opacities, feats = ctx.saved_tensors
        bins, tile_size = ctx.bins, ctx.tile_size
        C, N, F = feats.shape
        table = _pair_table(means2d, conics, opacities, feats)
        basis = _pixel_basis(tile_size, feats.dtype, feats.device)  # [P, 6]
        odds_max = ALPHA_MAX / (1.0 - ALPHA_MAX) * (1 - 1e-6)  # odds of a clamped alpha
        g_tiles = _to_tiles(grad_out.contiguous(), bins, tile_size)  # [C * T, P, F]
        gt_tiles = _to_tiles(grad_t_final[..., None].contiguous(), bins, tile_size)  # [C * T, P, 1]
        grads = table.new_zeros(C * N + 1, 6 + F)  # per Gaussian: mean (2), conic (3), log o (1), feats (F)
        for i, (tile_ids, length) in enumerate(bins.chunks):
            ids, mean, coefs = _chunk_inputs(table, tile_ids, length, bins, tile_size)
            weights, odds, t_last = ctx.saved[i] if ctx.saved is not None else _composite_chunk(basis, coefs)
            g, g_t = g_tiles[tile_ids], gt_tiles[tile_ids]  # [B, P, F], [B, P, 1]
            f = table[ids, 6:]  # [B, L, F]

            # dL/dq_i = alpha_i dL/dalpha_i = w_i (f_i . g) - odds_i (sum_{j>i} w_j (f_j . g) + T_final g_T)
            wfg = weights * (g @ f.transpose(1, 2))  # [B, P, L]
            rest = wfg.sum(-1, keepdim=True) + t_last * g_t  # [B, P, 1]
            later = torch.cumsum(wfg, dim=-1).neg_().add_(rest)
            d_q = wfg.sub_(later.mul_(odds))
            d_q.masked_fill_(odds > odds_max, 0.0)  # clamped alphas pass no gradient; skipped ones have odds 0

            d_coefs = basis.t() @ d_q  # [B, 6, L]
            d_pair = torch.cat([_coefficients_backward(mean, table[ids, 2:5], d_coefs), weights.transpose(1, 2) @ g], -1)
            grads.index_add_(0, ids.reshape(-1), d_pair.reshape(-1, 6 + F))
        ctx.saved = None
        grads = grads[:-1].reshape(C, N, 6 + F)
        d_opacity = grads[..., 5] / opacities.clamp_min(ALPHA_MIN)  # pairs exist only where o >= 1/255
        return grads[..., 0:2], grads[..., 2:5], d_opacity, grads[..., 6:], None, None, None, None


def _chunk_inputs(table: Tensor, tile_ids: Tensor, length: int, bins: TileBins, tile_size: int):
    """Pair ids [B, L], tile-local means [B, L, 2] and polynomial coefficients [B, 6, L] of one chunk."""
    ids = _gather_pairs(tile_ids, length, bins, dummy=table.shape[0] - 1)
    rows = table[ids]  # [B, L, 6 + F]
    mean = rows[..., 0:2] - _tile_centers(tile_ids, bins, tile_size, table.dtype)[:, None]
    return ids, mean, _coefficients(mean, rows[..., 2:5], rows[..., 5])


def _pair_table(means2d: Tensor, conics: Tensor, opacities: Tensor, feats: Tensor) -> Tensor:
    """[C * N + 1, 6 + F] rows (mean2d, conic, log o, feats) with a last dummy row of zero opacity."""
    C, N, F = feats.shape
    log_o = torch.log(opacities.clamp_min(ALPHA_MIN))[..., None]  # invisible ones never get paired
    table = torch.cat([means2d, conics, log_o, feats], dim=-1).reshape(C * N, 6 + F)
    dummy = table.new_zeros(1, 6 + F)
    dummy[0, 5] = -1e4  # log o: exp underflows to exactly 0, so padding contributes nothing
    return torch.cat([table, dummy], dim=0)


def _coefficients_backward(mean: Tensor, conic: Tensor, d_coefs: Tensor) -> Tensor:
    """[B, L, 6] gradients (mean2d, conic, log o) from gradients [B, 6, L] of `_coefficients`."""
    a, b, c = conic.unbind(-1)
    mx, my = mean.unbind(-1)
    g_a2, g_ab, g_c2, g_bx, g_by, g_k = d_coefs.unbind(1)  # [B, L] each
    bx, by = a * mx + b * my, b * mx + c * my
    return torch.stack(
        [
            a * g_bx + b * g_by - bx * g_k,  # d/d mean x
            b * g_bx + c * g_by - by * g_k,  # d/d mean y
            -0.5 * g_a2 + mx * g_bx - 0.5 * mx * mx * g_k,  # d/d a
            -g_ab + my * g_bx + mx * g_by - mx * my * g_k,  # d/d b
            -0.5 * g_c2 + my * g_by - 0.5 * my * my * g_k,  # d/d c
            g_k,  # d/d log o
        ],
        dim=-1,
    )


def rasterize_tiles(
    means2d: Tensor,  # [C, N, 2]
    conics: Tensor,  # [C, N, 3]
    opacities: Tensor,  # [C, N]
    feats: Tensor,  # [C, N, F]
    bins: TileBins,
    width: int,
    height: int,
    tile_size: int,
) -> tuple[Tensor, Tensor]:
    """Composite binned Gaussians: accumulated features [C, H, W, F] and final transmittance [C, H, W]."""
    return _TileComposite.apply(means2d, conics, opacities, feats, bins, tile_size, width, height)
