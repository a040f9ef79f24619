"""Enumerating the integer cells of many small boxes in bounded chunks, the candidate loop of gen3d's scan
rasterizers (texels of UV triangles, pixels of screen triangles)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor


def box_cells(lo: Tensor, size: Tensor, chunk: int) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """(box index, x, y) [n] of every integer cell of N boxes, at most `chunk` cells at a time.

    lo: [N, 2] int64 first cell (x, y) of each box; size: [N, 2] int64 cells along x and y (>= 0). Cells
    come box after box, x fastest within a box.
    """
    width = size[:, 0]
    counts = width * size[:, 1]
    starts = torch.cumsum(counts, 0) - counts
    total = int(counts.sum())
    for begin in range(0, total, chunk):
        idx = torch.arange(begin, min(begin + chunk, total), device=lo.device)
        box = torch.searchsorted(starts, idx, right=True) - 1
        local = idx - starts.index_select(0, box)
        w = width.index_select(0, box)
        yield box, lo[box, 0] + local % w, lo[box, 1] + local // w
