"""All-pairs rasterizer: every pixel meets every visible Gaussian. A second reference, by plain autograd.

Same compositing as the tile backend (see `gen3d.ops._raster_torch`) without any binning, so the two
agree exactly: the tile boxes hold every pixel where a Gaussian's alpha can reach 1/255. Pixels are
processed in chunks under activation checkpointing so that memory stays bounded; cost is N * H * W.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from gen3d.ops._projection import gaussian_alpha

CHUNK_PAIRS = 1 << 22  # Gaussian-pixel pairs per checkpointed chunk


def _composite_pixels(pixels: Tensor, means2d: Tensor, conics: Tensor, opacities: Tensor, feats: Tensor):
    """Front-to-back compositing of depth-sorted Gaussians [V, ...] at pixels [R, 2] -> [R, F], [R]."""
    d = pixels[:, None, :] - means2d[None]  # [R, V, 2]
    alpha = gaussian_alpha(opacities, conics, d[..., 0], d[..., 1])  # [R, V]
    one_minus = 1.0 - alpha
    trans = torch.cumprod(torch.cat([alpha.new_ones(alpha.shape[0], 1), one_minus], dim=1), dim=1)  # [R, V + 1]
    return (alpha * trans[:, :-1]) @ feats, trans[:, -1]


def rasterize_dense(
    means2d: Tensor,  # [C, N, 2]
    conics: Tensor,  # [C, N, 3]
    opacities: Tensor,  # [C, N]
    feats: Tensor,  # [C, N, F]
    depths: Tensor,  # [C, N] sort key
    visible: Tensor,  # [C, N] bool
    width: int,
    height: int,
    chunk_pairs: int = CHUNK_PAIRS,
) -> tuple[Tensor, Tensor]:
    """Accumulated features [C, H, W, F] and final transmittance [C, H, W], all pairs evaluated."""
    C, _, F = feats.shape
    ys, xs = torch.meshgrid(
        torch.arange(height, dtype=feats.dtype, device=feats.device) + 0.5,
        torch.arange(width, dtype=feats.dtype, device=feats.device) + 0.5,
        indexing="ij",
    )
    pixels = torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=-1)  # [H * W, 2]
    outs, transes = [], []
    for cam in range(C):
        ids = visible[cam].nonzero(as_tuple=True)[0]
        ids = ids[torch.argsort(depths[cam, ids].detach(), stable=True)]  # front to back
        args = (means2d[cam, ids], conics[cam, ids], opacities[cam, ids], feats[cam, ids])
        rows = max(1, chunk_pairs // max(1, ids.shape[0]))
        out_chunks, trans_chunks = [], []
        for start in range(0, pixels.shape[0], rows):
            chunk = pixels[start : start + rows]
            if torch.is_grad_enabled() and any(a.requires_grad for a in args):
                out, trans = checkpoint(_composite_pixels, chunk, *args, use_reentrant=False)
            else:
                out, trans = _composite_pixels(chunk, *args)
            out_chunks.append(out)
            trans_chunks.append(trans)
        outs.append(torch.cat(out_chunks).reshape(height, width, F))
        transes.append(torch.cat(trans_chunks).reshape(height, width))
    return torch.stack(outs), torch.stack(transes)
