"""Gaussian PLY files in the layout of the 3D Gaussian Splatting reference [Kerbl et al. 2023].

This is the file other splat viewers and editors read. One binary little-endian `vertex` element
with one float32 property per value, in this order:

    x y z                       mean
    nx ny nz                    unused, written as 0
    f_dc_0 f_dc_1 f_dc_2        DC SH coefficient per channel (rgb = C0 * f_dc + 0.5)
    f_rest_0 ... f_rest_{M-1}   higher SH bands, M = 3 (K - 1), channel-major: all K-1 red
                                coefficients, then green, then blue (f_rest[c (K-1) + k] = shN[k, c])
    opacity                     logit of the opacity
    scale_0 scale_1 scale_2     log of the scales
    rot_0 rot_1 rot_2 rot_3     quaternion (w, x, y, z), not normalized

Coordinates are gen3d world coordinates (+z up, front towards +x); some viewers expect other
axes and offer a rotation on import. Files are written with numpy only and atomically.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import numpy as np
import torch

from gen3d.errors import Gen3dError
from gen3d.io import atomic_path
from gen3d.representations.gaussians import GaussianConfig, GaussianModel

_PLY_TYPES = {
    "char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1", "short": "i2", "int16": "i2",
    "ushort": "u2", "uint16": "u2", "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
    "float": "f4", "float32": "f4", "double": "f8", "float64": "f8",
}
_MAX_HEADER = 1 << 16
_COUNT = re.compile(r"[0-9]+")


def gaussian_ply_properties(sh_degree: int) -> list[str]:
    """Property names of the vertex element, in file order, for Gaussians of `sh_degree`."""
    rest = 3 * ((sh_degree + 1) ** 2 - 1)
    return (
        ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
        + [f"f_rest_{i}" for i in range(rest)]
        + ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
    )


def save_gaussian_ply(path: str | os.PathLike, model: GaussianModel) -> Path:
    """Write `model` as a standard 3DGS PLY at `path` (atomically) and return the path."""
    with torch.no_grad():
        N = model.num_gaussians
        f_rest = model.shN.detach().transpose(1, 2).reshape(N, 3 * model.shN.shape[1])  # [N, 3 (K-1)] channel-major
        columns = torch.cat(
            [
                model.means.detach(), torch.zeros(N, 3, dtype=model.means.dtype, device=model.means.device),
                model.sh0.detach().reshape(N, 3), f_rest, model.opacity_logits.detach()[:, None],
                model.log_scales.detach(), model.quats.detach(),
            ],
            dim=1,
        ).to("cpu", torch.float32).numpy()  # [N, P]
    names = gaussian_ply_properties(model.sh_degree)
    assert columns.shape[1] == len(names)
    header = ["ply", "format binary_little_endian 1.0", "comment written by gen3d (3D Gaussian Splatting layout)",
              f"element vertex {N}"]
    header += [f"property float {name}" for name in names]
    header.append("end_header")
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(("\n".join(header) + "\n").encode("ascii"))
        f.write(np.ascontiguousarray(columns, dtype="<f4").tobytes())
    return path


def _parse_header(path: Path, data: bytes) -> tuple[int, str, list[tuple[str, int, list[tuple[str, str]]]]]:
    """(header length, format, [(element, count, [(property, numpy type)])]) or a Gen3dError.

    Counts are checked to be non-negative integers and property names to be unique per element; the caller checks
    counts against the file size before reading any data.
    """
    if not data.startswith(b"ply"):
        raise Gen3dError(f"{path} is not a PLY file (it does not start with 'ply')")
    lines, offset = [], 0
    while True:  # header lines up to and including end_header, each ended by a newline
        newline = data.find(b"\n", offset, _MAX_HEADER)
        if newline < 0:
            if b"end_header" in data[offset:_MAX_HEADER]:
                raise Gen3dError(f"{path}: PLY file ends right after its header (truncated)")
            raise Gen3dError(f"{path}: PLY header has no 'end_header' line in its first {_MAX_HEADER} bytes "
                             "(truncated or not a PLY file)")
        line = data[offset:newline].decode("ascii", errors="replace").strip()
        offset = newline + 1
        if line == "end_header":
            break
        lines.append(line)
    fmt, elements, seen = None, [], set()
    for raw in lines[1:]:
        words = raw.split()
        if not words or words[0] in ("comment", "obj_info"):
            continue
        if words[0] == "format" and len(words) >= 2:
            fmt = words[1]
        elif words[0] == "element" and len(words) == 3:
            if not _COUNT.fullmatch(words[2]):
                raise Gen3dError(f"{path}: PLY element count {words[2]!r} is not a non-negative integer ({raw!r})")
            elements.append((words[1], int(words[2]), []))
            seen = set()
        elif words[0] == "property" and elements:
            if len(words) == 5 and words[1] == "list":
                prop = (words[4], "list")
            elif len(words) == 3 and words[1] in _PLY_TYPES:
                prop = (words[2], _PLY_TYPES[words[1]])
            else:
                raise Gen3dError(f"{path}: unsupported PLY property line {raw!r}")
            if prop[0] in seen:
                raise Gen3dError(f"{path}: PLY element '{elements[-1][0]}' has property '{prop[0]}' twice")
            seen.add(prop[0])
            elements[-1][2].append(prop)
        else:
            raise Gen3dError(f"{path}: malformed PLY header line {raw!r}")
    return offset, fmt or "", elements


def load_gaussian_ply(path: str | os.PathLike, cfg: GaussianConfig | None = None) -> GaussianModel:
    """Read a 3DGS PLY (the layout of `save_gaussian_ply`, from gen3d or other tools) into a model.

    The SH degree is inferred from the number of `f_rest_*` properties; `cfg` supplies learning
    rates (its sh_degree is replaced by the file's). Raises `Gen3dError` for a file that is not a
    Gaussian PLY (a mesh or point-cloud PLY, an ASCII PLY, a truncated file).
    """
    path = Path(path)
    if not path.is_file():
        raise Gen3dError(f"Gaussian PLY {path} does not exist")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise Gen3dError(f"Gaussian PLY {path} cannot be read: {exc.strerror or exc}") from None
    offset, fmt, elements = _parse_header(path, data)
    if fmt not in ("binary_little_endian", "binary_big_endian"):
        raise Gen3dError(f"{path}: PLY format {fmt or '(missing)'} is not supported; 3DGS files are binary_little_endian")
    if not elements or elements[0][0] != "vertex":
        raise Gen3dError(f"{path}: expected a 'vertex' element first, found {[e[0] for e in elements]}")
    if any(name == "face" for name, _, _ in elements):
        raise Gen3dError(f"{path} is a mesh PLY (it has faces), not a 3D Gaussian Splatting PLY; load it as a mesh")
    _, count, props = elements[0]
    names = [name for name, _ in props]
    required = ["x", "y", "z", "f_dc_0", "f_dc_1", "f_dc_2", "opacity", "scale_0", "scale_1", "scale_2",
                "rot_0", "rot_1", "rot_2", "rot_3"]
    missing = [name for name in required if name not in names]
    if missing:
        raise Gen3dError(f"{path} is not a 3D Gaussian Splatting PLY: its vertices lack {', '.join(missing)}")
    if any(kind == "list" for _, kind in props):
        raise Gen3dError(f"{path}: list properties in the vertex element are not part of the 3DGS layout")

    order = "<" if fmt == "binary_little_endian" else ">"
    dtype = np.dtype([(name, order + kind) for name, kind in props])
    needed = count * dtype.itemsize
    if len(data) - offset < needed:
        raise Gen3dError(
            f"{path} is truncated: {count} Gaussians need {needed} bytes after the header, the file has {len(data) - offset}"
        )
    vertices = np.frombuffer(data, dtype=dtype, count=count, offset=offset)

    rest = [f"f_rest_{i}" for i in range(sum(n.startswith("f_rest_") for n in names))]
    if not set(rest) <= set(names):
        raise Gen3dError(f"{path}: f_rest properties are not numbered 0..{len(rest) - 1}")
    K = len(rest) // 3 + 1
    degree = round(math.sqrt(K)) - 1
    if len(rest) % 3 or (degree + 1) ** 2 != K or degree > 3:
        raise Gen3dError(f"{path}: {len(rest)} f_rest properties do not match any SH degree 0..3 (expected 0, 9, 24 or 45)")

    def stack(keys: list[str]) -> torch.Tensor:
        if not keys:
            return torch.zeros(count, 0)
        return torch.from_numpy(np.stack([vertices[k].astype(np.float32) for k in keys], axis=1))

    sh0 = stack(["f_dc_0", "f_dc_1", "f_dc_2"])[:, None, :]  # [N, 1, 3]
    shN = stack(rest).reshape(count, 3, K - 1).transpose(1, 2)  # channel-major -> [N, K-1, 3]
    return GaussianModel.from_tensors(
        stack(["x", "y", "z"]), stack(["scale_0", "scale_1", "scale_2"]), stack(["rot_0", "rot_1", "rot_2", "rot_3"]),
        stack(["opacity"])[:, 0], torch.cat([sh0, shN], dim=1), cfg,
    )
