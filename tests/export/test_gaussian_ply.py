import numpy as np
import pytest
import torch
from plyfile import PlyData, PlyElement

from gen3d.errors import Gen3dError
from gen3d.export import ply as ply_module
from gen3d.export.ply import gaussian_ply_properties, load_gaussian_ply, save_gaussian_ply
from gen3d.representations.gaussians import PARAM_NAMES, GaussianConfig, GaussianModel


def random_model(n: int, sh_degree: int, seed: int = 0) -> GaussianModel:
    g = torch.Generator().manual_seed(seed)
    K = (sh_degree + 1) ** 2
    return GaussianModel.from_tensors(
        torch.randn(n, 3, generator=g), torch.randn(n, 3, generator=g) - 3, torch.randn(n, 4, generator=g),
        torch.randn(n, generator=g), torch.randn(n, K, 3, generator=g), GaussianConfig(sh_degree=sh_degree),
    )


@pytest.mark.parametrize("sh_degree", [0, 3])
def test_standard_layout_read_by_plyfile(tmp_path, sh_degree):
    model = random_model(11, sh_degree)
    path = save_gaussian_ply(tmp_path / "model.ply", model)
    ply = PlyData.read(str(path))
    assert ply.byte_order == "<" and not ply.text
    assert [e.name for e in ply.elements] == ["vertex"]
    vertex = ply["vertex"]
    assert vertex.count == 11
    rest = 3 * ((sh_degree + 1) ** 2 - 1)
    expected = (["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"] + [f"f_rest_{i}" for i in range(rest)]
                + ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"])
    assert [p.name for p in vertex.properties] == expected == gaussian_ply_properties(sh_degree)
    assert all(vertex.data.dtype[p.name] == np.dtype("<f4") for p in vertex.properties)

    col = lambda *names: np.stack([vertex[n] for n in names], axis=1)
    assert np.array_equal(col("x", "y", "z"), model.means.detach().numpy())
    assert (col("nx", "ny", "nz") == 0).all()
    assert np.array_equal(col("f_dc_0", "f_dc_1", "f_dc_2"), model.sh0.detach()[:, 0].numpy())
    assert np.array_equal(vertex["opacity"], model.opacity_logits.detach().numpy())  # logit, not sigmoid
    assert np.array_equal(col("scale_0", "scale_1", "scale_2"), model.log_scales.detach().numpy())  # log-scales
    assert np.array_equal(col("rot_0", "rot_1", "rot_2", "rot_3"), model.quats.detach().numpy())  # w x y z, raw
    # f_rest is channel-major: all red coefficients, then green, then blue
    K1 = (sh_degree + 1) ** 2 - 1
    shN = model.shN.detach().numpy()
    for c in range(3):
        for k in range(K1):
            assert np.array_equal(vertex[f"f_rest_{c * K1 + k}"], shN[:, k, c])


@pytest.mark.parametrize("sh_degree", [0, 1, 2, 3])
def test_round_trip(tmp_path, sh_degree):
    model = random_model(9, sh_degree, seed=sh_degree)
    loaded = load_gaussian_ply(save_gaussian_ply(tmp_path / "m.ply", model))
    assert loaded.sh_degree == sh_degree and loaded.cfg.sh_degree == sh_degree
    for name in PARAM_NAMES:
        assert torch.equal(getattr(loaded, name), getattr(model, name)), name


def test_reads_a_file_written_by_another_tool(tmp_path):
    """A 3DGS file written by plyfile (as the reference implementation does), with doubles and extra fields."""
    n, K1 = 4, 3
    names = (["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"] + [f"f_rest_{i}" for i in range(3 * K1)]
             + ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3", "extra"])
    rng = np.random.default_rng(0)
    values = rng.normal(size=(n, len(names)))
    data = np.empty(n, dtype=[(name, "f8" if name == "x" else "f4") for name in names])
    for i, name in enumerate(names):
        data[name] = values[:, i]
    PlyData([PlyElement.describe(data, "vertex")]).write(str(tmp_path / "other.ply"))
    model = load_gaussian_ply(tmp_path / "other.ply")
    assert model.sh_degree == 1 and model.num_gaussians == n
    assert np.allclose(model.means[:, 0].detach().numpy(), values[:, 0], atol=1e-6)
    f_rest = values[:, 9:9 + 3 * K1].astype(np.float32)
    assert np.array_equal(model.shN.detach().numpy(), f_rest.reshape(n, 3, K1).transpose(0, 2, 1))
    assert np.array_equal(model.quats.detach().numpy(), values[:, -5:-1].astype(np.float32))


def test_rejects_files_that_are_not_gaussian_plys(tmp_path):
    import trimesh

    mesh_ply = tmp_path / "mesh.ply"
    mesh_ply.write_bytes(trimesh.creation.box().export(file_type="ply"))
    with pytest.raises(Gen3dError, match="mesh PLY"):
        load_gaussian_ply(mesh_ply)

    cloud = tmp_path / "cloud.ply"
    pts = np.zeros(3, dtype=[("x", "f4"), ("y", "f4"), ("z", "f4")])
    PlyData([PlyElement.describe(pts, "vertex")]).write(str(cloud))
    with pytest.raises(Gen3dError, match="lack f_dc_0"):
        load_gaussian_ply(cloud)

    good = save_gaussian_ply(tmp_path / "good.ply", random_model(20, 0))
    truncated = tmp_path / "truncated.ply"
    truncated.write_bytes(good.read_bytes()[:-10])
    with pytest.raises(Gen3dError, match="truncated"):
        load_gaussian_ply(truncated)
    header_only = tmp_path / "header.ply"
    header_only.write_bytes(good.read_bytes()[:100])
    with pytest.raises(Gen3dError, match="end_header"):
        load_gaussian_ply(header_only)

    junk = tmp_path / "junk.ply"
    junk.write_bytes(b"\x00\x01 not a ply")
    with pytest.raises(Gen3dError, match="not a PLY"):
        load_gaussian_ply(junk)
    with pytest.raises(Gen3dError, match="does not exist"):
        load_gaussian_ply(tmp_path / "missing.ply")

    ascii_ply = tmp_path / "ascii.ply"
    PlyData([PlyElement.describe(pts, "vertex")], text=True).write(str(ascii_ply))
    with pytest.raises(Gen3dError, match="ascii"):
        load_gaussian_ply(ascii_ply)


def test_failed_export_leaves_the_existing_file_intact(tmp_path, monkeypatch):
    path = save_gaussian_ply(tmp_path / "model.ply", random_model(5, 0))
    before = path.read_bytes()

    class FailingNumpy:
        def __getattr__(self, name):
            return getattr(np, name)

        @staticmethod
        def ascontiguousarray(*args, **kwargs):  # called after the header went to the temporary file
            raise RuntimeError("disk full")

    monkeypatch.setattr(ply_module, "np", FailingNumpy())
    with pytest.raises(RuntimeError, match="disk full"):
        save_gaussian_ply(path, random_model(50, 2))
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.ply"]  # no temporary left behind
