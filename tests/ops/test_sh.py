"""Spherical harmonics: constants, signs and order against closed forms, orthonormality, rotation closure."""

import math

import numpy as np
import pytest
import torch

from gen3d.ops.sh import C0, C1, eval_sh, num_sh_bases, rgb_to_sh, sh_basis, sh_to_rgb


def _legendre(l: int, m: int, x: np.ndarray) -> np.ndarray:
    """Associated Legendre P_l^m(x), m >= 0, with the Condon-Shortley phase (standard recursion)."""
    pmm = np.ones_like(x)
    somx2 = np.sqrt(np.clip(1 - x * x, 0, None))
    for i in range(1, m + 1):
        pmm = -pmm * (2 * i - 1) * somx2
    if l == m:
        return pmm
    pmmp1 = x * (2 * m + 1) * pmm
    for ll in range(m + 2, l + 1):
        pmm, pmmp1 = pmmp1, ((2 * ll - 1) * x * pmmp1 - (ll + m - 1) * pmm) / (ll - m)
    return pmmp1


def _real_sh(l: int, m: int, dirs: np.ndarray) -> np.ndarray:
    """Textbook orthonormal real SH Y_lm from spherical angles, independent of gen3d's polynomials."""
    x, y, z = dirs[:, 0], dirs[:, 1], dirs[:, 2]
    theta, phi = np.arccos(np.clip(z, -1, 1)), np.arctan2(y, x)
    k = math.sqrt((2 * l + 1) / (4 * math.pi) * math.factorial(l - abs(m)) / math.factorial(l + abs(m)))
    p = _legendre(l, abs(m), np.cos(theta))
    if m > 0:
        return math.sqrt(2) * k * np.cos(m * phi) * p
    if m < 0:
        return math.sqrt(2) * k * np.sin(-m * phi) * p
    return k * p


def _random_dirs(n: int, dtype=torch.float64) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(n, 3, dtype=dtype), dim=-1)


def test_degree0_is_c0_times_coeff():
    coeffs = torch.randn(7, 1, 3)
    out = eval_sh(0, coeffs, torch.randn(7, 3))
    torch.testing.assert_close(out, C0 * coeffs[:, 0])
    assert C0 == pytest.approx(1 / math.sqrt(4 * math.pi))


def test_rgb_sh_round_trip():
    rgb = torch.rand(10, 3)
    torch.testing.assert_close(sh_to_rgb(rgb_to_sh(rgb)), rgb)
    # the DC term evaluates (plus the caller's 0.5) to the color it was made from
    torch.testing.assert_close(eval_sh(0, rgb_to_sh(rgb)[:, None], torch.randn(10, 3)) + 0.5, rgb)


def test_degree1_explicit_3dgs_signs():
    dirs = _random_dirs(20)
    x, y, z = dirs.unbind(-1)
    coeffs = torch.randn(20, 4, 2, dtype=torch.float64)
    expected = C0 * coeffs[:, 0] - C1 * y[:, None] * coeffs[:, 1] + C1 * z[:, None] * coeffs[:, 2] - C1 * x[:, None] * coeffs[:, 3]
    torch.testing.assert_close(eval_sh(1, coeffs, dirs * 3.7), expected)  # dirs are normalized inside


@pytest.mark.parametrize("degree", [0, 1, 2, 3])
def test_basis_matches_textbook_real_sh(degree):
    dirs = _random_dirs(200)
    ours = sh_basis(degree, dirs).numpy()
    # 3DGS order: band by band, m = -l .. l, Condon-Shortley phase.
    ref = np.stack([_real_sh(l, m, dirs.numpy()) for l in range(degree + 1) for m in range(-l, l + 1)], -1)
    np.testing.assert_allclose(ours, ref, atol=1e-12)


def test_basis_orthonormal_on_the_sphere():
    # Gauss-Legendre in cos(theta) x uniform phi integrates these polynomials exactly.
    u, wu = np.polynomial.legendre.leggauss(12)
    phi = np.arange(16) * 2 * math.pi / 16
    uu, pp = np.meshgrid(u, phi, indexing="ij")
    s = np.sqrt(1 - uu**2)
    dirs = torch.from_numpy(np.stack([s * np.cos(pp), s * np.sin(pp), uu], -1).reshape(-1, 3))
    weights = torch.from_numpy((wu[:, None] * np.full_like(pp, 2 * math.pi / 16)).reshape(-1))
    basis = sh_basis(3, dirs)  # [Q, 16]
    gram = basis.t() @ (basis * weights[:, None])
    torch.testing.assert_close(gram, torch.eye(16, dtype=torch.float64), atol=1e-10, rtol=0)


def test_bands_are_closed_under_rotation():
    # Rotating the argument maps each band onto itself by an orthogonal matrix (and the band's
    # squared norm is the constant (2l + 1) / 4pi: the addition theorem).
    dirs = _random_dirs(300)
    q = torch.nn.functional.normalize(torch.randn(4, dtype=torch.float64), dim=0)
    w, x, y, z = q
    rot = torch.stack([
        torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)]),
        torch.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)]),
        torch.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)]),
    ])
    before, after = sh_basis(3, dirs), sh_basis(3, dirs @ rot.t())
    for l in range(4):
        band = slice(l * l, (l + 1) ** 2)
        torch.testing.assert_close((before[:, band] ** 2).sum(-1), torch.full((300,), (2 * l + 1) / (4 * math.pi), dtype=torch.float64))
        D = torch.linalg.lstsq(before[:, band], after[:, band]).solution  # after = before @ D
        torch.testing.assert_close(before[:, band] @ D, after[:, band], atol=1e-10, rtol=0)
        torch.testing.assert_close(D.t() @ D, torch.eye(2 * l + 1, dtype=torch.float64), atol=1e-10, rtol=0)


def test_extra_coefficients_are_ignored_and_shapes_broadcast():
    coeffs = torch.randn(2, 5, 16, 3)
    dirs = torch.randn(2, 5, 3)
    torch.testing.assert_close(eval_sh(2, coeffs, dirs), eval_sh(2, coeffs[..., :9, :], dirs))
    assert eval_sh(3, coeffs, dirs[:1]).shape == (2, 5, 3)  # dirs broadcast over leading dims
    assert num_sh_bases(3) == 16


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="needs coeffs"):
        eval_sh(2, torch.randn(4, 4, 3), torch.randn(4, 3))
    with pytest.raises(ValueError, match="dirs must be"):
        eval_sh(1, torch.randn(4, 4, 3), torch.randn(4, 2))
    with pytest.raises(ValueError, match="degree"):
        sh_basis(4, torch.randn(4, 3))
