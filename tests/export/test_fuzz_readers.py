"""Property-based fuzzing of the file readers: the 3DGS PLY reader (`load_gaussian_ply`), the GLB splitter
(`read_glb`) and the mesh / PLY loading of `gen3d view` (`snapshot_of`).

The property: whatever the bytes, a reader returns a result or raises a one-line `Gen3dError` naming the file;
never another exception, never an allocation sized by a count the file cannot back. Inputs are arbitrary bytes,
header-shaped garbage and mutations (truncation, changed header fields and counts, wrong property types, other
encodings, flipped bytes, chunk lengths past the end) of valid files written by gen3d's own exporters.
Examples are derandomized (the same inputs on every run) and no example database is written.
"""

import atexit
import functools
import shutil
import subprocess
import sys
import tempfile
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from gen3d.errors import Gen3dError
from gen3d.export.ply import load_gaussian_ply, save_gaussian_ply
from gen3d.export.sequence import read_glb
from gen3d.representations.gaussians import GaussianConfig, GaussianModel
from gen3d.viewer.snapshots import snapshot_of

FUZZ = dict(deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
WORK = Path(tempfile.mkdtemp(prefix="gen3d-fuzz-readers-"))  # one scratch file per reader, rewritten per example
atexit.register(shutil.rmtree, WORK, True)


def expect_error_or(call, path: Path):
    """call() or None if it raised a one-line Gen3dError that names `path`; any other exception fails the test."""
    try:
        return call()
    except Gen3dError as exc:
        message = str(exc)
        assert "\n" not in message and path.name in message, message
        return None


# ---------------------------------------------------------------------------------------------------------------
# 3DGS PLY

def tiny_model(n: int, degree: int, seed: int = 0) -> GaussianModel:
    g = torch.Generator().manual_seed(seed)
    K = (degree + 1) ** 2
    return GaussianModel.from_tensors(torch.randn(n, 3, generator=g), torch.randn(n, 3, generator=g) - 3,
                                      torch.randn(n, 4, generator=g), torch.randn(n, generator=g),
                                      torch.randn(n, K, 3, generator=g), GaussianConfig(sh_degree=degree))


@functools.lru_cache(maxsize=None)
def valid_ply(degree: int) -> bytes:
    """A 3DGS PLY of 4 Gaussians written by the exporter."""
    return save_gaussian_ply(WORK / f"valid-{degree}.ply", tiny_model(4, degree)).read_bytes()


def split_ply(data: bytes) -> tuple[list[str], bytes]:
    end = data.index(b"end_header\n") + len(b"end_header\n")
    return data[:end].decode("ascii", errors="surrogateescape").split("\n")[:-1], data[end:]


def join_ply(lines: list[str], body: bytes) -> bytes:
    return ("\n".join(lines) + "\n").encode("utf-8", errors="surrogateescape") + body


COUNTS = st.one_of(st.integers(-5, 10).map(str), st.integers(10**6, 10**18).map(str),
                   st.sampled_from(["", "1e3", "0x10", "four", "3.0", "-0", "\u0663", "4 4", "+4"]),
                   st.text(max_size=6))
TYPES = st.sampled_from(["char", "uchar", "short", "ushort", "int", "uint", "float", "double", "int8", "float64",
                         "list uchar float", "list uchar int", "list", "bogus", "float float", ""])
NAMES = st.sampled_from(["x", "y", "opacity", "f_dc_0", "f_rest_0", "f_rest_8", "f_rest_99", "f_rest_a", "f_rest_",
                         "f_rest_-1", "rot_3", "nx", "", "vertex_indices"])
FORMATS = st.sampled_from(["binary_little_endian 1.0", "binary_big_endian 1.0", "ascii 1.0", "binary_little_endian",
                           "binary_middle_endian 1.0", "", "ascii"])
LINES = st.one_of(
    st.builds("element {} {}".format, st.sampled_from(["vertex", "face", "normal"]), COUNTS),
    st.builds("property {} {}".format, TYPES, NAMES),
    st.builds("format {}".format, FORMATS),
    st.sampled_from(["ply", "end_header", "comment end_header", "obj_info x", "property", "element", "format",
                     "element vertex", "property list uchar int", "", "end_header\r"]),
    st.text(max_size=30),
)


@st.composite
def mutated_ply(draw) -> bytes:
    """A valid exporter PLY with one or two mutations of its header or bytes."""
    data = valid_ply(draw(st.sampled_from([0, 1])))
    for _ in range(draw(st.integers(1, 2))):
        lines, body = split_ply(data) if b"end_header\n" in data else ([], b"")
        kind = draw(st.sampled_from(["truncate", "count", "type", "name", "format", "replace", "insert", "drop",
                                     "flip", "body"] if lines else ["truncate", "flip"]))
        if kind == "truncate":
            data = data[:draw(st.integers(0, max(len(data) - 1, 0)))]
            continue
        if kind == "flip":
            if data:
                at = draw(st.integers(0, len(data) - 1))
                data = data[:at] + bytes([draw(st.integers(0, 255))]) + data[at + 1:]
            continue
        props = [i for i, line in enumerate(lines) if line.startswith("property ")]
        if kind == "count":
            i = lines.index("element vertex 4") if "element vertex 4" in lines else 2
            lines[i] = f"element vertex {draw(COUNTS)}"
        elif kind == "type":
            i = draw(st.sampled_from(props))
            lines[i] = f"property {draw(TYPES)} {lines[i].split()[-1]}"
        elif kind == "name":
            i = draw(st.sampled_from(props))
            lines[i] = f"property float {draw(NAMES)}"
        elif kind == "format":
            lines[1] = f"format {draw(FORMATS)}"
        elif kind == "replace":
            lines[draw(st.integers(0, len(lines) - 1))] = draw(LINES)
        elif kind == "insert":
            lines.insert(draw(st.integers(0, len(lines))), draw(LINES))
        elif kind == "drop":
            del lines[draw(st.integers(0, len(lines) - 1))]
        elif kind == "body":
            body = draw(st.sampled_from([b"", body[: len(body) // 2], body + body, body[::-1],
                                         body + draw(st.binary(max_size=64))]))
        data = join_ply(lines, body)
    return data


def check_ply(data: bytes) -> None:
    path = WORK / "fuzz.ply"
    path.write_bytes(data)
    model = expect_error_or(lambda: load_gaussian_ply(path), path)
    event("loaded" if model is not None else "Gen3dError")  # shown by --hypothesis-show-statistics
    if model is not None:
        assert isinstance(model, GaussianModel)
        # each Gaussian takes at least 14 one-byte properties: nothing was made up beyond what the file holds
        assert model.num_gaussians * 14 <= len(data)


@settings(max_examples=250, **FUZZ)
@given(st.one_of(st.binary(max_size=400), st.binary(max_size=200).map(lambda b: b"ply\n" + b)))
def test_ply_reader_on_arbitrary_bytes(data):
    check_ply(data)


@settings(max_examples=250, **FUZZ)
@given(st.lists(LINES, max_size=25), st.binary(max_size=300))
def test_ply_reader_on_header_shaped_garbage(lines, body):
    check_ply(join_ply(["ply", *lines, "end_header"], body))


@settings(max_examples=500, **FUZZ)
@given(mutated_ply())
def test_ply_reader_on_mutated_exporter_files(data):
    check_ply(data)


@settings(max_examples=60, **FUZZ)
@given(st.integers(0, 5), st.integers(0, 3), st.data())
def test_ply_round_trip_is_exact(n, degree, data):
    """Any float32 values, NaN and infinities included, come back bit for bit."""
    K = (degree + 1) ** 2
    values = data.draw(arrays(np.float32, (n, 11 + 3 * K), elements=st.floats(width=32)))  # [N, 3+3+4+1+3K]
    t = torch.from_numpy(values)
    model = GaussianModel.from_tensors(t[:, :3], t[:, 3:6], t[:, 6:10], t[:, 10], t[:, 11:].reshape(n, K, 3),
                                       GaussianConfig(sh_degree=degree))
    loaded = load_gaussian_ply(save_gaussian_ply(WORK / "round-trip.ply", model))
    assert loaded.sh_degree == degree and loaded.num_gaussians == n
    for name in ("means", "log_scales", "quats", "opacity_logits", "sh0", "shN"):
        a, b = getattr(model, name).detach(), getattr(loaded, name).detach()
        assert a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32)), name


def test_big_endian_variant_loads_the_same_and_ascii_is_refused(tmp_path):
    from plyfile import PlyData

    model = tiny_model(5, 1, seed=3)
    ply = PlyData.read(str(save_gaussian_ply(tmp_path / "le.ply", model)))
    ply.byte_order = ">"
    ply.write(str(tmp_path / "be.ply"))
    assert b"binary_big_endian" in (tmp_path / "be.ply").read_bytes()[:100]
    loaded = load_gaussian_ply(tmp_path / "be.ply")
    for name in ("means", "log_scales", "quats", "opacity_logits", "sh0", "shN"):
        assert torch.equal(getattr(loaded, name), getattr(model, name)), name
    ply.text = True
    ply.write(str(tmp_path / "ascii.ply"))
    with pytest.raises(Gen3dError, match="ascii.ply: PLY format ascii is not supported"):
        load_gaussian_ply(tmp_path / "ascii.ply")


@pytest.mark.parametrize("count", ["1000000000", "999999999999999999", "-1", "4.5"])
def test_lying_vertex_count_fails_before_allocating(tmp_path, count):
    """A header that claims a billion Gaussians is refused against the file size, with no large allocation."""
    lines, body = split_ply(valid_ply(0))
    lines[lines.index("element vertex 4")] = f"element vertex {count}"
    path = tmp_path / "liar.ply"
    path.write_bytes(join_ply(lines, body))
    tracemalloc.start()
    try:
        with pytest.raises(Gen3dError, match="truncated|not a non-negative integer"):
            load_gaussian_ply(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 10 * len(path.read_bytes()) + (1 << 20), peak


# ---------------------------------------------------------------------------------------------------------------
# GLB

@functools.lru_cache(maxsize=None)
def valid_glb() -> bytes:
    """A small vertex-colored GLB written by the exporter."""
    import trimesh

    from gen3d.export.mesh import save_mesh

    mesh = trimesh.creation.box()
    mesh.visual.vertex_colors = np.tile([200, 30, 30, 255], (len(mesh.vertices), 1)).astype(np.uint8)
    return save_mesh(WORK / "valid.glb", mesh).read_bytes()


def u32(value: int) -> bytes:
    return int(value).to_bytes(4, "little")


@st.composite
def mutated_glb(draw) -> bytes:
    """A valid exporter GLB with one or two mutations: header fields, chunk lengths and types, the JSON text."""
    data = bytearray(valid_glb())
    json_length = int.from_bytes(data[12:16], "little")
    bin_header = 20 + json_length  # the BIN chunk's (length, type)
    for _ in range(draw(st.integers(1, 2))):
        kind = draw(st.sampled_from(["magic", "version", "length", "json_length", "bin_length", "chunk_type",
                                     "json_text", "json_garble", "truncate", "extend", "flip"]))
        big = st.one_of(st.integers(0, 64), st.integers(0, 2**32 - 1), st.just(len(data)), st.just(json_length))
        if kind == "magic":
            data[0:4] = draw(st.binary(min_size=4, max_size=4))
        elif kind == "version":
            data[4:8] = u32(draw(st.integers(0, 2**32 - 1)))
        elif kind == "length" and len(data) >= 12:
            data[8:12] = u32(draw(big))
        elif kind == "json_length" and len(data) >= 16:
            data[12:16] = u32(draw(big))
        elif kind == "bin_length" and len(data) >= bin_header + 4:
            data[bin_header:bin_header + 4] = u32(draw(big))
        elif kind == "chunk_type" and len(data) >= 20:
            at = draw(st.sampled_from([16, bin_header + 4]))
            data[at:at + 4] = draw(st.sampled_from([b"JSON", b"BIN\0", b"XXXX", b"\0\0\0\0"]))
        elif kind == "json_text" and len(data) >= 20 + json_length:  # same length, so the framing stays right
            text = draw(st.one_of(st.text(min_size=json_length, max_size=json_length).map(lambda s: s.encode()),
                                  st.binary(min_size=json_length, max_size=json_length),
                                  st.sampled_from([b"[1, 2]", b"null", b"\"x\"", b"[" * 5000, b"{\"a\": 1}"])))
            data[20:20 + json_length] = text[:json_length].ljust(json_length, b" ")
        elif kind == "json_garble" and len(data) >= 20 + json_length and json_length:
            at = 20 + draw(st.integers(0, json_length - 1))
            data[at] = ord(draw(st.sampled_from("{}[]\",:x\\\x00")))
        elif kind == "truncate":
            del data[draw(st.integers(0, max(len(data) - 1, 0))):]
        elif kind == "extend":
            data += draw(st.binary(min_size=1, max_size=16))
        elif kind == "flip" and data:
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data)


def check_glb(data: bytes) -> None:
    path = Path("fuzz.glb")
    result = expect_error_or(lambda: read_glb(data, source=str(path)), path)
    event("read" if result is not None else "Gen3dError")
    if result is not None:
        gltf, binary = result
        assert isinstance(gltf, dict) and isinstance(binary, bytes) and len(binary) <= len(data)


def test_valid_glb_reads():
    gltf, binary = read_glb(valid_glb(), source="valid.glb")
    assert gltf["asset"]["version"] == "2.0" and len(binary) == gltf["buffers"][0]["byteLength"]


@settings(max_examples=250, **FUZZ)
@given(st.one_of(st.binary(max_size=200), st.binary(max_size=200).map(lambda b: b"glTF\x02\0\0\0" + b),
                 st.binary(max_size=200).map(lambda b: b"glTF\x02\0\0\0" + u32(12 + len(b)) + b)))
def test_glb_reader_on_arbitrary_bytes(data):
    check_glb(data)


@settings(max_examples=500, **FUZZ)
@given(mutated_glb())
def test_glb_reader_on_mutated_exporter_files(data):
    check_glb(data)


# ---------------------------------------------------------------------------------------------------------------
# gen3d view: meshes (.glb, .obj, .ply, .stl, .off) and 3DGS PLYs, through trimesh and load_gaussian_ply

@functools.lru_cache(maxsize=None)
def valid_mesh_file(suffix: str) -> bytes:
    import trimesh

    from gen3d.export.mesh import save_mesh

    if suffix == ".glb":
        return valid_glb()
    mesh = trimesh.creation.icosphere(subdivisions=1)
    if suffix in (".obj", ".ply"):
        return save_mesh(WORK / f"valid{suffix}", mesh).read_bytes()
    data = mesh.export(file_type="stl_ascii" if suffix == ".stl" else suffix[1:])
    return data.encode() if isinstance(data, str) else data


@st.composite
def mesh_file(draw) -> tuple[str, bytes]:
    suffix = draw(st.sampled_from([".glb", ".obj", ".ply", ".stl", ".off"]))
    kind = draw(st.sampled_from(["bytes", "truncate", "flip", "text"]))
    data = valid_mesh_file(suffix)
    if kind == "bytes":
        data = draw(st.binary(max_size=300))
    elif kind == "truncate":
        data = data[:draw(st.integers(0, len(data) - 1))]
    elif kind == "flip":
        for _ in range(draw(st.integers(1, 4))):
            at = draw(st.integers(0, len(data) - 1))
            data = data[:at] + bytes([draw(st.integers(0, 255))]) + data[at + 1:]
    else:  # text-format garbage: right keywords, wrong numbers
        words = st.sampled_from(["v", "f", "vt", "vn", "1", "-1", "0", "nan", "1e308", "99999999", "2/3", "ply",
                                 "OFF", "solid", "facet", "vertex", "endloop", "element", "3", "\n"])
        data = " ".join(draw(st.lists(words, max_size=60))).encode()
    return suffix, data


@settings(max_examples=150, **FUZZ)
@given(mesh_file())
def test_view_loading_of_damaged_mesh_files(case):
    suffix, data = case
    path = WORK / f"fuzz-view{suffix}"
    path.write_bytes(data)
    result = expect_error_or(lambda: snapshot_of(str(path)), path)
    event(f"{suffix} " + ("loaded" if result is not None else "Gen3dError"))
    if result is not None:
        snapshot, title, description = result
        assert title == path.name and description in ("mesh", "3DGS PLY")
        if description == "mesh":
            assert len(snapshot.mesh.faces) > 0


@settings(max_examples=40, **FUZZ)
@given(mutated_ply())
def test_view_loading_of_damaged_gaussian_plys(data):
    path = WORK / "fuzz-view-gaussians.ply"
    path.write_bytes(data)
    expect_error_or(lambda: snapshot_of(str(path)), path)


def test_gen3d_view_reports_damaged_files_in_one_line(tmp_path):
    """The real CLI: a damaged GLB and a PLY whose vertex count lies exit with status 2 and one `error:` line."""
    glb = bytearray(valid_glb())
    glb[12:16] = u32(10**9)  # JSON chunk length far past the end
    (tmp_path / "damaged.glb").write_bytes(bytes(glb))
    lines, body = split_ply(valid_ply(0))
    lines[lines.index("element vertex 4")] = "element vertex 999999999999"
    (tmp_path / "liar.ply").write_bytes(join_ply(lines, body))
    for name in ("damaged.glb", "liar.ply"):
        proc = subprocess.run([sys.executable, "-m", "gen3d.cli", "view", str(tmp_path / name)],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
        assert name in proc.stderr and "Traceback" not in proc.stderr
