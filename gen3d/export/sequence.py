"""Exports of 4D results: mesh sequences (a flip-book GLB or numbered OBJs) and animated turntable frames.

**Flip-book GLB.** `save_mesh_sequence(meshes, "clip.glb", fps)` writes one glTF 2.0 binary file whose scene has
one node per frame (``frame_000``, ``frame_001``, ...), each with its own mesh, and one animation that shows the
frames in turn. glTF 2.0 (Khronos, spec version 2.0.1) facts this relies on:

- Sec. 3.11 "Animations": a channel targets a node's ``translation``, ``rotation``, ``scale`` or ``weights``; its
  sampler's *input* accessor holds keyframe times in seconds (float scalars, strictly increasing, with ``min`` and
  ``max`` required) and its *output* accessor the values (VEC3 floats for ``scale``). With ``STEP`` interpolation
  "the animated values remain constant to the output of the first keyframe, until the next keyframe". A
  sampler's input may be shared by several samplers. The clip lasts until the largest keyframe time; how it
  repeats (looping) is up to the player.
- Sec. 3.5.3 "Transformations": a node targeted by an animation may carry only TRS properties, never ``matrix``.
- Sec. 3.6.2.4 "Data Alignment": an accessor's offset into its buffer view and the view's offset into the buffer
  are multiples of the component size (4 bytes for floats).
- Sec. 4 "GLB File Format Specification": a 12-byte header (magic ``glTF``, version 2, total length), then chunks
  of (uint32 length, uint32 type, data): the JSON chunk (type ``JSON``, padded with spaces) first, then the
  binary chunk (type ``BIN\\0``, padded with zeros) that is buffer 0; every chunk is 4-byte aligned, and the
  buffer's ``byteLength`` may be up to 3 bytes shorter than its padded chunk.

Node i gets a ``scale`` channel with STEP keyframes at times k / fps, k = 0..F: (1, 1, 1) at k = i and (0, 0, 0) at
the others, so it is visible exactly during its slot [i / fps, (i + 1) / fps) of a clip of F / fps seconds. The
last key (k = F) only marks the clip's end and repeats frame F - 1's values, so a player that does not loop stops
on the last frame. At rest (outside an animation player) frames 1.. are scaled to zero, so a static viewer shows
frame 0. trimesh writes the scene (vertex colors or a baked texture, as `gen3d.export.mesh.save_mesh` would);
the animation is appended to the GLB's JSON and binary chunks here, with no extra dependency.

**OBJ sequences.** ``save_mesh_sequence(meshes, "out/clip.obj")`` writes ``out/clip_000.obj``, ``clip_001.obj``
... (with ``clip_000.mtl`` / ``clip_000.png`` when textured) as a set: into a temporary folder first, then moved.

**Animated turntables.** `animated_turntable` renders a video in which the camera orbits once while time loops
`cycles` times; `fixed_view_frames` renders a clip from one camera. Both return rgb [F, H, W, 3] for
`gen3d.export.video.write_video`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from gen3d.cameras import Cameras, orbit_cameras
from gen3d.errors import Gen3dError
from gen3d.export.mesh import _WORLD_TO_GLTF, save_mesh
from gen3d.io import atomic_path
from gen3d.rendering.types import RenderOutput

SEQUENCE_FORMATS = (".glb", ".obj")

_GLB_MAGIC, _GLB_VERSION = 0x46546C67, 2  # b"glTF" little-endian, glTF 2.0
_CHUNK_JSON, _CHUNK_BIN = 0x4E4F534A, 0x004E4942  # b"JSON", b"BIN\0" little-endian
_FLOAT = 5126  # accessor componentType FLOAT
_TURNTABLE_CHUNK = 8  # cameras per render call


def save_mesh_sequence(meshes: list, path: str | os.PathLike, fps: float = 8.0) -> Path:
    """Write F `trimesh.Trimesh` frames as one flip-book `.glb` or as an `.obj` sequence; returns what was written.

    meshes: F >= 1 meshes in gen3d world coordinates (+z up), each with vertex colors or a baked texture.
    path: ``<folder>/<stem>.glb`` -> that one file (nodes ``frame_000`` ... and a looping ``scale`` STEP animation
        of F / fps seconds, see the module docstring; +y up as glTF requires), returned;
        ``<folder>/<stem>.obj`` -> ``<stem>_000.obj``, ``<stem>_001.obj``, ... in `folder` (world coordinates, with
        their ``.mtl`` / ``.png`` when textured), written as a set; returns `folder`. Files of an earlier, longer
        sequence with the same stem (``<stem>_NNN.obj|mtl|png`` with NNN >= F) are removed.
    fps: frames per second of the GLB animation (> 0).
    Raises ValueError for another suffix, no meshes, a mesh without faces or with non-finite vertices, or fps <= 0,
    and `Gen3dError` for a textured OBJ frame whose material trimesh cannot write. A failure leaves the files that
    were at the targets before untouched and no partial output.
    """
    import trimesh

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SEQUENCE_FORMATS:
        raise ValueError(f"save_mesh_sequence: cannot write {path.name!r}: use one of {', '.join(SEQUENCE_FORMATS)}")
    meshes = list(meshes)
    if not meshes:
        raise ValueError(f"save_mesh_sequence: meshes is empty; nothing to write to {str(path)!r}")
    for i, mesh in enumerate(meshes):
        if not isinstance(mesh, trimesh.Trimesh):
            raise ValueError(f"save_mesh_sequence: meshes[{i}] must be a trimesh.Trimesh, got {type(mesh).__name__}")
        if len(mesh.faces) == 0 or not np.isfinite(mesh.vertices).all():
            bad = int((~np.isfinite(mesh.vertices)).sum())
            raise ValueError(f"save_mesh_sequence: meshes[{i}] must have faces and finite vertices, got "
                             f"{len(mesh.faces)} faces and {bad} non-finite coordinates")
    if not (isinstance(fps, (int, float, np.integer, np.floating)) and np.isfinite(fps) and fps > 0):
        raise ValueError(f"save_mesh_sequence: fps must be a finite number > 0, got {fps!r}")
    if suffix == ".glb":
        data = flipbook_glb(meshes, fps)
        with atomic_path(path) as tmp:
            tmp.write_bytes(data)
        return path
    return _save_obj_sequence(meshes, path)


def frame_name(i: int) -> str:
    """The node and mesh name of frame i in a flip-book GLB: ``frame_000``."""
    return f"frame_{i:03d}"


def flipbook_glb(meshes: list, fps: float) -> bytes:
    """The bytes of a flip-book GLB of `meshes` (gen3d world coordinates) at `fps`; see `save_mesh_sequence`."""
    import trimesh

    scene = trimesh.Scene()
    for i, mesh in enumerate(meshes):
        mesh = mesh.copy()
        mesh.apply_transform(_WORLD_TO_GLTF)  # glTF is +y up, as in save_mesh
        scene.add_geometry(mesh, node_name=frame_name(i), geom_name=frame_name(i))
    gltf, binary = read_glb(scene.export(file_type="glb"))
    binary = add_flipbook_animation(gltf, binary, [frame_name(i) for i in range(len(meshes))], fps)
    return write_glb(gltf, binary)


def add_flipbook_animation(gltf: dict, binary: bytes, node_names: list[str], fps: float,
                           name: str = "flipbook") -> bytes:
    """Add to `gltf` (edited in place) an animation showing the named nodes one after the other; returns the new
    binary buffer (`binary` with the keyframe data appended).

    Node i is scaled (1, 1, 1) during [i / fps, (i + 1) / fps) and (0, 0, 0) otherwise, by STEP keyframes at k / fps,
    k = 0..F, all channels sharing one time accessor (glTF 2.0 Sec. 3.11). Any ``matrix`` of those nodes (which
    animated nodes must not have, Sec. 3.5.3) is replaced by the equivalent TRS only if it is the identity.
    """
    F = len(node_names)
    nodes = gltf.get("nodes", [])
    index = {node.get("name"): i for i, node in enumerate(nodes)}
    missing = [n for n in node_names if n not in index]
    if missing:
        raise ValueError(f"add_flipbook_animation: the glTF has no nodes named {missing}")
    for n in node_names:
        node = nodes[index[n]]
        if "matrix" in node:
            if not np.allclose(node["matrix"], np.eye(4).reshape(-1)):
                raise ValueError(f"add_flipbook_animation: node {n!r} has a non-identity matrix; expected TRS")
            del node["matrix"]
    for n in node_names[1:]:  # at rest (a viewer that does not play animations) only the first frame shows
        nodes[index[n]]["scale"] = [0.0, 0.0, 0.0]

    times = np.arange(F + 1, dtype=np.float32) / np.float32(fps)  # [F + 1] seconds
    visible = np.eye(F + 1, F, dtype=np.float32)  # [F + 1 keys, F nodes]: node i shown at key i
    visible[F] = visible[F - 1]  # the end key holds the last frame
    blobs = [times.tobytes()] + [np.repeat(visible[:, i, None], 3, axis=1).tobytes() for i in range(F)]

    buffer = bytearray(binary)
    buffer += b"\0" * (-len(buffer) % 4)  # float data starts 4-byte aligned (Sec. 3.6.2.4)
    view = len(gltf.setdefault("bufferViews", []))
    gltf["bufferViews"].append({"buffer": 0, "byteOffset": len(buffer), "byteLength": sum(map(len, blobs))})
    buffer += b"".join(blobs)
    accessors = gltf.setdefault("accessors", [])
    first = len(accessors)
    accessors.append({"bufferView": view, "byteOffset": 0, "componentType": _FLOAT, "count": F + 1, "type": "SCALAR",
                      "min": [float(times[0])], "max": [float(times[-1])]})
    offset = len(blobs[0])
    for i in range(F):
        accessors.append({"bufferView": view, "byteOffset": offset, "componentType": _FLOAT, "count": F + 1,
                          "type": "VEC3"})
        offset += len(blobs[1 + i])
    samplers = [{"input": first, "output": first + 1 + i, "interpolation": "STEP"} for i in range(F)]
    channels = [{"sampler": i, "target": {"node": index[n], "path": "scale"}} for i, n in enumerate(node_names)]
    gltf.setdefault("animations", []).append({"name": name, "samplers": samplers, "channels": channels})
    buffers = gltf.setdefault("buffers", [{}])
    buffers[0]["byteLength"] = len(buffer)
    return bytes(buffer)


def read_glb(data: bytes, source: str = "GLB") -> tuple[dict, bytes]:
    """Split a GLB (glTF 2.0 Sec. 4) into its JSON (a dict) and its binary chunk (b"" when there is none).

    source: what to call the data in errors (a file name). Raises `Gen3dError` naming `source` for data that is not
    a well-formed GLB: a bad header or total length, a chunk running past the end, no JSON chunk, or a JSON chunk
    that is not UTF-8 JSON of an object.
    """
    if len(data) < 20:
        raise Gen3dError(f"{source}: {len(data)} bytes is too short for a GLB file (a glTF binary needs at least 20)")
    magic, version, length = struct.unpack_from("<III", data, 0)
    if magic != _GLB_MAGIC or version != _GLB_VERSION:
        raise Gen3dError(f"{source} is not a glTF 2.0 binary (GLB): it starts with {bytes(data[:4])!r} version "
                         f"{version}, expected b'glTF' version 2")
    if length != len(data):
        raise Gen3dError(f"{source}: GLB header says {length} bytes, the data has {len(data)} (truncated or damaged)")
    chunks, offset = {}, 12
    while offset < length:
        if offset + 8 > length:
            raise Gen3dError(f"{source}: GLB chunk header at byte {offset} runs past the end ({length} bytes)")
        size, kind = struct.unpack_from("<II", data, offset)
        if offset + 8 + size > length:
            raise Gen3dError(f"{source}: GLB chunk at byte {offset} claims {size} bytes, past the end ({length} bytes)")
        chunks.setdefault(kind, bytes(data[offset + 8:offset + 8 + size]))
        offset += 8 + size
    if _CHUNK_JSON not in chunks:
        raise Gen3dError(f"{source}: the GLB has no JSON chunk")
    try:
        gltf = json.loads(chunks[_CHUNK_JSON].decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise Gen3dError(f"{source}: the GLB's JSON chunk is not valid UTF-8 JSON ({str(exc)[:100]})") from None
    if not isinstance(gltf, dict):
        raise Gen3dError(f"{source}: the GLB's JSON chunk holds a {type(gltf).__name__}, not a glTF object")
    return gltf, chunks.get(_CHUNK_BIN, b"")


def write_glb(gltf: dict, binary: bytes) -> bytes:
    """A GLB (glTF 2.0 Sec. 4) of a glTF JSON dict and the bytes of buffer 0 (its byteLength must match)."""
    text = json.dumps(gltf, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 4)
    chunks = struct.pack("<II", len(text), _CHUNK_JSON) + text
    if binary:
        padded = binary + b"\0" * (-len(binary) % 4)
        chunks += struct.pack("<II", len(padded), _CHUNK_BIN) + padded
    return struct.pack("<III", _GLB_MAGIC, _GLB_VERSION, 12 + len(chunks)) + chunks


def _save_obj_sequence(meshes: list, path: Path) -> Path:
    """``<stem>_000.obj`` ... into path's folder: all written to a temporary folder, then moved in."""
    folder, stem = path.parent, path.stem
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{stem}.", suffix=".tmp", dir=folder))
    try:
        for i, mesh in enumerate(meshes):
            save_mesh(tmp / f"{stem}_{i:03d}.obj", mesh)
            if getattr(mesh.visual, "kind", None) == "texture" and not (tmp / f"{stem}_{i:03d}.mtl").is_file():
                # trimesh drops a material it cannot encode (e.g. a float image) without a word
                raise Gen3dError(f"save_mesh_sequence: the material of meshes[{i}] could not be written as an OBJ "
                                 "material (is its texture an 8-bit RGB(A) image?); nothing was written")
        written = sorted(p.name for p in tmp.iterdir() if not p.name.startswith("."))
        for name in written:  # renames within one folder: the set is complete before anything is moved
            os.replace(tmp / name, folder / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    pattern = re.compile(rf"{re.escape(stem)}_(\d{{3,}})\.(obj|mtl|png)")
    for old in folder.iterdir():  # frames of an earlier, longer sequence would be read as part of this one
        match = pattern.fullmatch(old.name)
        if match and int(match.group(1)) >= len(meshes) and old.is_file():
            old.unlink()
    return folder


RenderFn = Callable[[Cameras, float], RenderOutput]
"""render(cameras [C], t) -> RenderOutput with rgb [C, H, W, 3]: the scene at time t in [0, 1] from C cameras."""


def turntable_times(frames: int, cycles: int = 2) -> list[float]:
    """t_i = (i * cycles / frames) mod 1 for i < frames: time runs `cycles` times through [0, 1), so the clip loops."""
    return [(i * cycles % frames) / frames for i in range(frames)]


@torch.no_grad()
def animated_turntable(render: RenderFn, frames: int, elevation: float, distance: float, fovy: float, size: int,
                       cycles: int = 2) -> Tensor:
    """A looping turntable of a dynamic scene -> rgb [frames, size, size, 3] float in [0, 1], on the CPU.

    Frame i is seen from `gen3d.cameras.orbit_cameras` camera i (azimuth i * 360 / frames degrees: one full orbit
    over the video, at `elevation` degrees, `distance`, vertical field of view `fovy` degrees) at time
    t_i = (i * cycles / frames) mod 1 (`turntable_times`). Frames that share a time are rendered together, in calls
    of at most 8 cameras: `render` is called once per distinct time (more often only for a time shared by more than
    8 frames). Cameras are passed on the CPU; `render` moves them where it needs.
    """
    _check_count("frames", frames, 1)
    _check_count("size", size, 1)
    _check_count("cycles", cycles, 0)
    cameras = orbit_cameras(frames, elevation, distance, fovy, size, size)
    groups: dict[int, list[int]] = {}
    for i in range(frames):
        groups.setdefault(i * cycles % frames, []).append(i)  # exact integer key of t_i
    video = torch.zeros(frames, size, size, 3)
    for key, members in groups.items():
        for start in range(0, len(members), _TURNTABLE_CHUNK):
            idx = members[start:start + _TURNTABLE_CHUNK]
            video[idx] = _rgb(render(cameras[torch.tensor(idx)], key / frames), len(idx), size, size)
    return video


@torch.no_grad()
def fixed_view_frames(render: RenderFn, times: Sequence[float] | Tensor, camera: Cameras) -> Tensor:
    """The clip seen from one camera -> rgb [F, H, W, 3] float in [0, 1], on the CPU; frame f at time times[f].

    camera: a `Cameras` of one camera (H x W images); `render` is called once per time.
    """
    if len(camera) != 1:
        raise ValueError(f"fixed_view_frames: camera must hold exactly one camera, got {len(camera)}")
    times = [float(t) for t in (times.reshape(-1).tolist() if isinstance(times, Tensor) else times)]
    if not times:
        raise ValueError("fixed_view_frames: times is empty")
    return torch.cat([_rgb(render(camera, t), 1, camera.height, camera.width) for t in times])


def _rgb(out: RenderOutput, C: int, H: int, W: int) -> Tensor:
    """out.rgb checked to be [C, H, W, 3], on the CPU, float, clamped to [0, 1]."""
    rgb = out.rgb
    if tuple(rgb.shape) != (C, H, W, 3):
        raise ValueError(f"render returned rgb of shape {list(rgb.shape)} for {C} cameras of {W}x{H}; "
                         f"expected {[C, H, W, 3]}")
    return rgb.detach().float().cpu().clamp(0.0, 1.0)


def _check_count(name: str, value: int, low: int) -> None:
    if not (isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= low):
        raise ValueError(f"animated_turntable: {name} must be an integer >= {low}, got {value!r}")
