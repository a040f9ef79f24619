"""4D exports: flip-book GLBs (read back by an independent GLB reader, trimesh and the Khronos validator), OBJ
sequences, atomic failure, and animated turntables / fixed-view clips of a render function."""

import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image

from gen3d.cameras import orbit_cameras, spherical_cameras
from gen3d.errors import Gen3dError
from gen3d.export.sequence import animated_turntable, fixed_view_frames, save_mesh_sequence, turntable_times
from gen3d.export.texture import textured_mesh
from gen3d.rendering.gaussian import render_gaussians
from gen3d.rendering.types import RenderOutput
from gen3d.representations.deformation import DeformationConfig, DeformationField
from gen3d.representations.dynamic import DynamicGaussians
from gen3d.representations.gaussians import GaussianConfig, GaussianModel
from tests.export.test_mesh_export import validate_gltf

COMPONENTS = {5126: np.float32, 5125: np.uint32, 5123: np.uint16, 5121: np.uint8}
WIDTHS = {"SCALAR": 1, "VEC2": 2, "VEC3": 3, "VEC4": 4}


# --- an independent reader of what the GLB holds ---------------------------------------------------------------

def parse_glb(path):
    """(json, bin) of a GLB, checking the container layout of glTF 2.0 Sec. 4 on the way."""
    data = Path(path).read_bytes()
    magic, version, length = struct.unpack_from("<4sII", data)
    assert (magic, version, length) == (b"glTF", 2, len(data))
    json_len, json_type = struct.unpack_from("<I4s", data, 12)
    assert json_type == b"JSON" and json_len % 4 == 0
    gltf = json.loads(data[20:20 + json_len])
    bin_len, bin_type = struct.unpack_from("<I4s", data, 20 + json_len)
    assert bin_type == b"BIN\0" and bin_len % 4 == 0 and 28 + json_len + bin_len == len(data)
    assert bin_len - 3 <= gltf["buffers"][0]["byteLength"] <= bin_len
    return gltf, data[28 + json_len:28 + json_len + bin_len]


def accessor(gltf, binary, index):
    a = gltf["accessors"][index]
    view = gltf["bufferViews"][a["bufferView"]]
    start = view.get("byteOffset", 0) + a.get("byteOffset", 0)
    width = WIDTHS[a["type"]]
    values = np.frombuffer(binary, COMPONENTS[a["componentType"]], a["count"] * width, start)
    return values.reshape(a["count"], width)


def scale_at(gltf, binary, node, t):
    """The STEP-interpolated scale of `node` at time t (the last keyframe at or before t)."""
    anim = gltf["animations"][0]
    channel = next(c for c in anim["channels"] if c["target"]["node"] == node)
    sampler = anim["samplers"][channel["sampler"]]
    times = accessor(gltf, binary, sampler["input"])[:, 0]
    return accessor(gltf, binary, sampler["output"])[np.searchsorted(times, t, side="right") - 1]


# --- meshes ------------------------------------------------------------------------------------------------------

def colored_frames(n):
    """n spheres moving along +x, each of its own color."""
    sphere = trimesh.creation.icosphere(subdivisions=1, radius=0.3)
    frames = []
    for i in range(n):
        rgba = np.tile(np.array([255, 40 * i, 255 - 40 * i, 255], np.uint8), (len(sphere.vertices), 1))
        frames.append(trimesh.Trimesh(sphere.vertices + [0.2 * i, 0.0, 0.0], sphere.faces, vertex_colors=rgba,
                                      process=False))
    return frames


def textured_frame(i, size=8, mode="RGB"):
    box = trimesh.creation.box(extents=(0.5, 0.5, 0.5))
    rng = np.random.default_rng(i)
    uv = rng.random((len(box.vertices), 2)).astype(np.float32)
    mesh = textured_mesh(box.vertices + [0.0, 0.0, 0.1 * i], box.faces, uv,
                         rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    if mode != "RGB":  # an image PNG cannot hold: the mesh cannot be written
        mesh.visual.material.baseColorTexture = Image.new(mode, (size, size))
    return mesh


# --- flip-book GLB -----------------------------------------------------------------------------------------------

def test_glb_flipbook_has_one_node_per_frame_and_a_step_scale_animation(tmp_path):
    F, fps = 4, 5.0
    meshes = colored_frames(F)
    path = save_mesh_sequence(meshes, tmp_path / "clip.glb", fps=fps)
    assert path == tmp_path / "clip.glb"
    gltf, binary = parse_glb(path)

    names = [f"frame_{i:03d}" for i in range(F)]
    nodes = {n["name"]: i for i, n in enumerate(gltf["nodes"]) if "name" in n}
    assert set(names) <= set(nodes)
    assert len({gltf["nodes"][nodes[n]]["mesh"] for n in names}) == F  # each frame its own mesh
    assert all("matrix" not in gltf["nodes"][nodes[n]] for n in names)  # animated nodes are TRS only

    (anim,) = gltf["animations"]
    assert sorted(c["target"]["node"] for c in anim["channels"]) == sorted(nodes[n] for n in names)
    for channel in anim["channels"]:
        assert channel["target"]["path"] == "scale"
        sampler = anim["samplers"][channel["sampler"]]
        assert sampler["interpolation"] == "STEP"
        times = accessor(gltf, binary, sampler["input"])[:, 0]
        np.testing.assert_allclose(times, np.arange(F + 1) / fps, rtol=1e-6)
        a = gltf["accessors"][sampler["input"]]
        assert a["min"] == pytest.approx([0.0]) and a["max"] == pytest.approx([F / fps])
        assert accessor(gltf, binary, sampler["output"]).shape == (F + 1, 3)

    # played back: during slot [i/fps, (i+1)/fps) exactly node i is shown, at full scale
    for t in np.arange(0, F / fps, 0.25 / fps) + 1e-4:
        shown = [i for i, n in enumerate(names) if scale_at(gltf, binary, nodes[n], t).any()]
        assert shown == [int(t * fps)], t
        np.testing.assert_array_equal(scale_at(gltf, binary, nodes[names[shown[0]]], t), [1, 1, 1])

    scene = trimesh.load(path, process=False)
    assert isinstance(scene, trimesh.Scene) and len(scene.geometry) == F
    for i, name in enumerate(names):
        geometry = scene.geometry[scene.graph[name][1]]
        # +y up as in save_mesh: gen3d (x, y, z) is glTF (y, z, x)
        np.testing.assert_allclose(geometry.vertices, meshes[i].vertices[:, [1, 2, 0]], atol=1e-6)
        np.testing.assert_array_equal(geometry.visual.vertex_colors, meshes[i].visual.vertex_colors)


def test_glb_flipbook_passes_the_khronos_validator(tmp_path):
    path = save_mesh_sequence(colored_frames(3), tmp_path / "clip.glb", fps=8)
    issues = validate_gltf(path)
    assert issues["numErrors"] == 0 and issues["numWarnings"] == 0, issues["messages"]


def test_textured_glb_flipbook_keeps_each_texture_and_passes_the_validator(tmp_path):
    meshes = [textured_frame(0), textured_frame(1), textured_frame(1)]  # the last two identical
    path = save_mesh_sequence(meshes, tmp_path / "clip.glb")
    gltf, _ = parse_glb(path)
    assert len({n["mesh"] for n in gltf["nodes"] if n.get("name", "").startswith("frame_")}) == 3
    scene = trimesh.load(path, process=False)
    assert len(scene.geometry) == 3
    for i in range(3):
        geometry = scene.geometry[scene.graph[f"frame_{i:03d}"][1]]
        assert geometry.visual.kind == "texture"
        image = np.asarray(geometry.visual.material.baseColorTexture.convert("RGB"))
        np.testing.assert_array_equal(image, np.asarray(meshes[i].visual.material.baseColorTexture))
    issues = validate_gltf(path)
    assert issues["numErrors"] == 0, issues["messages"]


def test_a_single_frame_is_a_valid_flipbook(tmp_path):
    path = save_mesh_sequence(colored_frames(1), tmp_path / "one.glb", fps=2)
    gltf, binary = parse_glb(path)
    node = next(i for i, n in enumerate(gltf["nodes"]) if n.get("name") == "frame_000")
    for t in (0.0, 0.3, 0.5):
        np.testing.assert_array_equal(scale_at(gltf, binary, node, t), [1, 1, 1])


# --- OBJ sequences -----------------------------------------------------------------------------------------------

def test_obj_sequence_writes_numbered_files_that_load_back(tmp_path):
    meshes = colored_frames(2) + [textured_frame(2)]
    folder = save_mesh_sequence(meshes, tmp_path / "out" / "clip.obj")
    assert folder == tmp_path / "out"
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["clip_000.obj", "clip_001.obj", "clip_002.mtl", "clip_002.obj", "clip_002.png"]
    for i, mesh in enumerate(meshes):
        loaded = trimesh.load(folder / f"clip_{i:03d}.obj", force="mesh", process=False)
        np.testing.assert_allclose(loaded.vertices, mesh.vertices, atol=1e-5)  # OBJ keeps world coordinates
        assert len(loaded.faces) == len(mesh.faces)
        if i < 2:
            assert np.abs(loaded.visual.vertex_colors.astype(int) - mesh.visual.vertex_colors.astype(int)).max() <= 1
        else:
            assert loaded.visual.kind == "texture" and loaded.visual.material.image.size == (8, 8)

    # a shorter sequence under the same name replaces the longer one: no stale frames remain
    save_mesh_sequence(colored_frames(1), tmp_path / "out" / "clip.obj")
    assert sorted(p.name for p in folder.iterdir()) == ["clip_000.obj"]


# --- atomicity and errors ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".glb", ".obj"])
def test_a_failed_export_leaves_earlier_files_intact_and_nothing_partial(tmp_path, suffix):
    path = tmp_path / f"clip{suffix}"
    save_mesh_sequence(colored_frames(3)[2:], path)  # differs from every frame of the failing export
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert before  # clip.glb, or clip_000.obj

    meshes = colored_frames(2) + [textured_frame(2, mode="F")]  # a float texture: PNG cannot hold it
    with pytest.raises((OSError, Gen3dError)):
        save_mesh_sequence(meshes, path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temporary files or folders left


def test_bad_suffix_empty_list_and_bad_meshes_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match=r"\.glb, \.obj"):
        save_mesh_sequence(colored_frames(1), tmp_path / "clip.ply")
    with pytest.raises(ValueError, match="empty"):
        save_mesh_sequence([], tmp_path / "clip.glb")
    with pytest.raises(ValueError, match="fps"):
        save_mesh_sequence(colored_frames(1), tmp_path / "clip.glb", fps=0)
    with pytest.raises(ValueError, match=r"meshes\[1\] must have faces"):
        save_mesh_sequence(colored_frames(1) + [trimesh.Trimesh()], tmp_path / "clip.glb")
    assert list(tmp_path.iterdir()) == []


# --- animated turntables -----------------------------------------------------------------------------------------

class Probe:
    """A render function whose image says what it was asked: red = t, green = the camera's azimuth / 360 (from its
    eye position), blue = 2 (clamped away by the turntable). Records (number of cameras, t) of every call."""

    def __init__(self):
        self.calls = []

    def __call__(self, cameras, t):
        self.calls.append((len(cameras), t))
        eye = cameras.eyes
        azimuth = torch.rad2deg(torch.atan2(eye[:, 1], eye[:, 0])) % 360  # [C]
        rgb = torch.empty(len(cameras), cameras.height, cameras.width, 3)
        rgb[..., 0] = t
        rgb[..., 1] = (azimuth / 360)[:, None, None]
        rgb[..., 2] = 2.0
        zeros = torch.zeros(len(cameras), cameras.height, cameras.width, 1)
        return RenderOutput(rgb=rgb, alpha=zeros + 1, depth=zeros)


@pytest.mark.parametrize("frames, cycles", [(12, 2), (10, 3), (20, 20), (9, 0)])
def test_turntable_orbits_once_while_time_loops_cycles_times(frames, cycles):
    probe = Probe()
    video = animated_turntable(probe, frames, elevation=20, distance=2.0, fovy=40, size=4, cycles=cycles)
    assert video.shape == (frames, 4, 4, 3) and video.dtype == torch.float32
    assert video.min() >= 0 and video.max() <= 1

    i = torch.arange(frames, dtype=torch.float64)
    want_t = (i * cycles / frames) % 1
    torch.testing.assert_close(video[:, 0, 0, 0].double(), want_t, atol=1e-6, rtol=0)
    want_azimuth = (i * 360 / frames) % 360 / 360
    got_azimuth = video[:, 0, 0, 1].double()
    wrapped = torch.minimum((got_azimuth - want_azimuth).abs(), 1 - (got_azimuth - want_azimuth).abs())
    assert wrapped.max() < 1e-4, (got_azimuth, want_azimuth)
    assert turntable_times(frames, cycles) == pytest.approx(want_t.tolist())

    distinct = sorted({round(float(t), 9) for t in want_t})
    assert sorted({round(t, 9) for _, t in probe.calls}) == distinct
    per_time = {t: frames // len(distinct) for t in distinct}
    assert len(probe.calls) == sum(math.ceil(n / 8) for n in per_time.values())  # one call per time and 8 cameras
    assert all(1 <= c <= 8 for c, _ in probe.calls) and sum(c for c, _ in probe.calls) == frames


def test_turntable_and_fixed_view_reject_bad_arguments():
    probe = Probe()
    with pytest.raises(ValueError, match="frames"):
        animated_turntable(probe, 0, 15, 2.0, 40, 4)
    with pytest.raises(ValueError, match="cycles"):
        animated_turntable(probe, 4, 15, 2.0, 40, 4, cycles=-1)
    with pytest.raises(ValueError, match="shape"):
        animated_turntable(lambda cams, t: probe(cams[:1], t), 4, 15, 2.0, 40, 4)
    with pytest.raises(ValueError, match="one camera"):
        fixed_view_frames(probe, [0.0], orbit_cameras(2, width=4, height=4))
    with pytest.raises(ValueError, match="empty"):
        fixed_view_frames(probe, [], orbit_cameras(1, width=4, height=4))


def test_fixed_view_frames_renders_each_time_from_the_one_camera():
    probe = Probe()
    one = lambda v: torch.tensor([float(v)])  # noqa: E731
    camera = spherical_cameras(one(90), one(10), one(2.0), one(40), 6, 4)
    clip = fixed_view_frames(probe, torch.tensor([0.0, 0.25, 0.5, 1.0]), camera)
    assert clip.shape == (4, 4, 6, 3)
    torch.testing.assert_close(clip[:, 0, 0, 0], torch.tensor([0.0, 0.25, 0.5, 1.0]))
    torch.testing.assert_close(clip[:, 0, 0, 1], torch.full((4,), 0.25), atol=1e-5, rtol=0)
    assert probe.calls == [(1, 0.0), (1, 0.25), (1, 0.5), (1, 1.0)]


def moving_gaussians():
    """200 Gaussians that a deformation field shifts along +x by about 0.3 at t = 0, less until t = 1/3, and not at
    all for t >= 2/3 (where the space-time features vanish and the field, without biases, outputs zero)."""
    g = GaussianModel.random_ball(GaussianConfig(num_points=200, init_radius=0.4, sh_degree=0),
                                  generator=torch.Generator().manual_seed(0))
    dyn = DynamicGaussians(g, DeformationField(DeformationConfig(resolutions=[4], time_resolution=4, features=2,
                                                                 hidden=8)))
    with torch.no_grad():
        for layer in (dyn.field.mlp[0], dyn.field.mlp[2]):
            layer.weight.abs_()  # non-negative features stay non-negative: the motion is zero only where they are
            layer.bias.zero_()
        dyn.field.temporal[0][0, :, 2:] = 0.0  # the x-t plane is zero at t >= 2/3
        head = dyn.field.heads["means"]
        head.weight[0] = 1.0
        head.weight[0] *= 0.3 / dyn.field(g.means, 0.0)[0][:, 0].mean()
    return dyn


def test_turntable_of_dynamic_gaussians_matches_direct_renders():
    dyn, white = moving_gaussians(), torch.ones(3)

    def render(cameras, t):
        return render_gaussians(dyn.at(t), cameras, white, backend="torch")

    frames, size = 8, 16
    video = animated_turntable(render, frames, elevation=15, distance=2.5, fovy=45, size=size, cycles=2)
    assert video.shape == (frames, size, size, 3) and 0 <= video.min() and video.max() <= 1
    cameras = orbit_cameras(frames, 15, 2.5, 45, size, size)
    times = turntable_times(frames, 2)
    with torch.no_grad():
        for i in range(frames):
            want = render_gaussians(dyn.at(times[i]), cameras[i], white, backend="torch").rgb[0].clamp(0, 1)
            torch.testing.assert_close(video[i], want, atol=1e-5, rtol=0)
        # time matters: frame 0 (t = 0, moved) differs from the same view of the still canonical Gaussians
        still = render_gaussians(dyn.gaussians, cameras[0], white, backend="torch").rgb[0]
    assert (video[0] - still).abs().max() > 0.1

    clip = fixed_view_frames(render, [0.0, 0.75], cameras[0])
    torch.testing.assert_close(clip[0], video[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(clip[1], still.clamp(0, 1), atol=1e-4, rtol=0)  # t = 3/4: no motion


def test_glb_flipbook_shows_frame_0_at_rest(tmp_path):
    """A viewer that does not play the animation sees frame 0 only: the other nodes rest at scale 0."""
    from gen3d.export.sequence import read_glb

    path = save_mesh_sequence(colored_frames(3), tmp_path / "clip.glb", fps=8)
    gltf, _ = read_glb(path.read_bytes())
    scales = {n["name"]: n.get("scale", [1.0, 1.0, 1.0]) for n in gltf["nodes"] if n.get("name", "").startswith("frame_")}
    assert scales == {"frame_000": [1.0, 1.0, 1.0], "frame_001": [0.0, 0.0, 0.0], "frame_002": [0.0, 0.0, 0.0]}
