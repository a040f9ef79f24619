"""Hash-grid and triplane fields: shapes and ranges, density 0 outside the box, the blob bias (a ball at
initialization with outward normals that agree with finite differences), second derivatives for normal
losses, fitting a target density with Adam, optimizer groups, the truncated exponential, and config and
input checks."""

import math

import pytest
import torch

from gen3d.representations.fields import (
    Field,
    HashGridConfig,
    HashGridField,
    TriplaneConfig,
    TriplaneField,
    trunc_exp,
)

# Small encodings so that every test runs in well under a second; the defaults are covered by test_defaults.
SMALL_HASH = {"num_levels": 6, "features_per_level": 2, "log2_hashmap_size": 12, "base_resolution": 4,
              "finest_resolution": 64}
SMALL_PLANES = {"num_features": 8, "resolution": 32}


def make(kind: str, **overrides) -> Field:
    if kind == "hash":
        return HashGridField(HashGridConfig(**{**SMALL_HASH, **overrides}))
    return TriplaneField(TriplaneConfig(**{**SMALL_PLANES, **overrides}))


KINDS = ["hash", "triplane"]


def _sphere_points(n: int, radius: float) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(n, 3), dim=-1) * radius


@pytest.mark.parametrize("kind", KINDS)
def test_shapes_and_ranges(kind):
    field = make(kind)
    points = torch.rand(100, 3) * 2.4 - 1.2
    out = field(points)
    assert out.density.shape == (100,) and out.features.shape == (100, 3)
    assert field.feature_dim == 3 and field.bound == 1.0
    assert (out.density >= 0).all() and ((out.features >= 0) & (out.features <= 1)).all()
    torch.testing.assert_close(field.density(points), out.density)


def test_defaults():
    hash_field, plane_field = HashGridField(), TriplaneField()
    assert tuple(hash_field.tables.shape) == (16, 2**16, 2)
    assert hash_field.resolutions[0] == 16 and hash_field.resolutions[-1] == 512
    assert hash_field.tables.abs().max() <= 1e-4
    assert tuple(plane_field.planes.shape) == (3, 32, 64, 64)
    for field in (hash_field, plane_field):
        out = field(torch.rand(64, 3) * 2 - 1)
        assert out.density.shape == (64,) and out.features.shape == (64, 3)


@pytest.mark.parametrize("kind", KINDS)
def test_density_is_zero_outside_the_box(kind):
    field = make(kind, bound=2.0)
    inside = torch.tensor([[1.5, 0.0, 0.0], [0.0, -1.9, 1.9], [1.99, 1.99, -1.99]])
    outside = torch.tensor([[2.1, 0.0, 0.0], [0.0, -2.5, 0.0], [0.0, 0.0, 30.0], [-2.01, 1.0, 1.0]])
    assert (field.density(inside) > 0).all()
    assert (field.density(outside) == 0).all()


@pytest.mark.parametrize("kind", KINDS)
def test_blob_bias_gives_a_ball(kind):
    field = make(kind)
    center = field.density(torch.zeros(1, 3))
    shell = field.density(_sphere_points(200, 0.9))
    # softplus(10 + small MLP output) at the center, softplus(-8 + ...) at 0.9
    assert 8.0 < center.item() < 12.0
    assert (shell < 0.01).all() and (center > 100 * shell.max())
    no_blob = make(kind, density_bias="none").density(torch.zeros(1, 3))
    assert no_blob.item() < 2.0  # softplus of a small MLP output, ~0.7


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("radius", [0.3, 0.7])
def test_blob_normals_point_outward(kind, radius):
    field = make(kind)
    points = _sphere_points(200, radius)
    outward = points / radius
    analytic = field.normals(points, "analytic")
    finite = field.normals(points, "finite_difference", eps=1e-3)
    assert analytic.shape == (200, 3)
    torch.testing.assert_close(analytic.norm(dim=-1), torch.ones(200))
    assert (analytic * outward).sum(-1).min() > 0.99
    assert (analytic * finite).sum(-1).min() > 0.99


@pytest.mark.parametrize("kind", KINDS)
def test_normal_loss_reaches_the_encoding(kind):
    """Analytic normals in training mode are differentiable: a loss on them gives the tables/planes a gradient."""
    field = make(kind)
    field.train()
    points = _sphere_points(64, 0.5)
    normals = field.normals(points, "analytic")
    target = torch.nn.functional.normalize(torch.randn(64, 3), dim=-1)
    (normals * target).sum().backward()
    encoding = field.encoding_parameters()[0]
    assert encoding.grad is not None and encoding.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", KINDS)
def test_fits_a_target_density(kind):
    """A few Adam steps pull the field toward a ball off the origin: the loss drops by more than 20x."""
    field = make(kind, density_bias="none")
    center = torch.tensor([0.3, -0.2, 0.1])

    def target(p):
        return 20.0 * torch.sigmoid(30.0 * (0.35 - (p - center).norm(dim=-1)))

    opt = torch.optim.Adam(field.param_groups(lr_network=0.01), betas=(0.9, 0.99), eps=1e-15)
    generator = torch.Generator().manual_seed(0)
    probe = torch.rand(4096, 3, generator=generator) * 2 - 1

    def loss_on(p):
        return (torch.log1p(field.density(p)) - torch.log1p(target(p))).square().mean()

    with torch.no_grad():
        start = loss_on(probe).item()
    for _ in range(150):
        points = torch.rand(2048, 3, generator=generator) * 2 - 1
        opt.zero_grad()
        loss_on(points).backward()
        opt.step()
    with torch.no_grad():
        end = loss_on(probe).item()
    assert end < 0.05 * start, (start, end)  # measured: ~1e-3 of the start


@pytest.mark.parametrize("kind", KINDS)
def test_param_groups(kind):
    field = make(kind)
    groups = field.param_groups()
    assert [g["name"] for g in groups] == ["encoding", "network"]
    assert [g["lr"] for g in groups] == [0.01, 0.001]
    assert groups[0]["params"] == field.encoding_parameters()
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in field.parameters())  # every parameter exactly once
    assert [g["lr"] for g in field.param_groups(lr_encoding=0.5, lr_network=0.25)] == [0.5, 0.25]


def test_exp_activation_and_trunc_exp():
    x = torch.tensor([0.0, 5.0, 20.0], requires_grad=True)
    y = trunc_exp(x)
    torch.testing.assert_close(y, torch.exp(x.detach()))
    (grad,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    torch.testing.assert_close(grad, torch.exp(torch.tensor([0.0, 5.0, 15.0])))  # clamped at exp(15)
    (second,) = torch.autograd.grad(grad.sum(), x)
    torch.testing.assert_close(second, torch.tensor([1.0, math.exp(5.0), 0.0]))
    field = make("hash", density_activation="exp")
    assert field.density(torch.zeros(1, 3)).item() > math.exp(9)  # exp(10 + small)


def test_triplane_product_and_concat():
    product = make("triplane", reduce="product")
    assert ((product.planes - 1).abs() <= 1.01e-4).all()  # starts at 1, so the product neither vanishes
    concat = make("triplane", reduce="concat")
    assert concat.density_net[0].in_features == 3 * SMALL_PLANES["num_features"]
    for field in (product, concat):
        out = field(torch.rand(10, 3) * 2 - 1)
        assert out.density.shape == (10,) and out.features.shape == (10, 3)


@pytest.mark.parametrize("kind", KINDS)
def test_bad_points_raise(kind):
    field = make(kind)
    with pytest.raises(ValueError, match=r"points must be a float tensor \[P, 3\], got \(4, 2\)"):
        field(torch.zeros(4, 2))
    with pytest.raises(ValueError, match=r"points must be a float tensor \[P, 3\], got \(4, 3\) torch.int64"):
        field.density(torch.zeros(4, 3, dtype=torch.long))


@pytest.mark.parametrize("make_cfg,match", [
    (lambda: HashGridConfig(density_activation="relu"), r"density_activation must be one of .* got 'relu'"),
    (lambda: HashGridConfig(density_bias="ball"), r"density_bias must be one of .* got 'ball'"),
    (lambda: HashGridConfig(bound=0.0), r"bound must be > 0, got 0.0"),
    (lambda: HashGridConfig(base_resolution=64, finest_resolution=32), r"base_resolution must be <= finest_resolution"),
    (lambda: HashGridConfig(log2_hashmap_size=40), r"log2_hashmap_size must be an int in 1..26, got 40"),
    (lambda: HashGridConfig(backend="cuda"), r"backend must be one of .* got 'cuda'"),
    (lambda: TriplaneConfig(reduce="mean"), r"reduce must be one of .* got 'mean'"),
    (lambda: TriplaneConfig(resolution=1), r"resolution must be an int >= 2, got 1"),
    (lambda: TriplaneConfig(blob_radius=-1.0), r"blob_radius must be > 0"),
    (lambda: HashGridField(TriplaneConfig()), r"cfg must be a HashGridConfig, got TriplaneConfig"),
])
def test_bad_configs_raise(make_cfg, match):
    with pytest.raises(ValueError, match=match):
        make_cfg()
