"""Triplane sampling: parity with a hand-written bilinear reference (forward and backward, every
reduction), the documented plane axes and align_corners convention, bilinear exactness, gradcheck and
gradgradcheck in float64, and input checks."""

import pytest
import torch

from gen3d.ops.triplane import REDUCTIONS, sample_triplane, sample_triplane_reference

F64 = torch.float64


def _bilinear(plane, u, v):
    """A second, loop-free reference: plane [F, R, R] at continuous (column u, row v) in texel units."""
    R = plane.shape[-1]
    u0, v0 = u.floor().clamp(0, R - 2).long(), v.floor().clamp(0, R - 2).long()
    fu, fv = u - u0, v - v0
    return ((1 - fu) * (1 - fv) * plane[:, v0, u0] + fu * (1 - fv) * plane[:, v0, u0 + 1]
            + (1 - fu) * fv * plane[:, v0 + 1, u0] + fu * fv * plane[:, v0 + 1, u0 + 1])  # [F, P]


@pytest.mark.parametrize("reduce", REDUCTIONS)
def test_parity_with_reference(reduce):
    planes = torch.randn(3, 4, 9, 9, dtype=F64, requires_grad=True)
    x = (torch.rand(200, 3, dtype=F64) * 2.4 - 1.2).requires_grad_()  # some points outside [-1, 1]
    out = sample_triplane(planes, x, reduce)
    ref = sample_triplane_reference(planes, x, reduce)
    assert out.shape == (200, 12 if reduce == "concat" else 4)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    w = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad((out * w).sum(), (planes, x)), torch.autograd.grad((ref * w).sum(), (planes, x))):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_plane_axes_and_reductions_by_hand():
    """Plane 0 is read at (x, y), plane 1 at (x, z), plane 2 at (y, z); width = first axis, height = second."""
    R = 5
    planes = torch.randn(3, 2, R, R, dtype=F64)
    x = torch.rand(50, 3, dtype=F64) * 2 - 1
    to_texel = lambda t: (t + 1) / 2 * (R - 1)  # align_corners=True
    samples = [_bilinear(planes[0], to_texel(x[:, 0]), to_texel(x[:, 1])),
               _bilinear(planes[1], to_texel(x[:, 0]), to_texel(x[:, 2])),
               _bilinear(planes[2], to_texel(x[:, 1]), to_texel(x[:, 2]))]
    torch.testing.assert_close(sample_triplane(planes, x, "sum"), sum(samples).t())
    torch.testing.assert_close(sample_triplane(planes, x, "product"), (samples[0] * samples[1] * samples[2]).t())
    torch.testing.assert_close(sample_triplane(planes, x, "concat"), torch.cat(samples).t())


def test_texels_sit_on_the_grid_vertices():
    """align_corners=True: texel (i, j) of plane xy is returned exactly at x = -1 + 2 j / (R - 1), y = -1 + 2 i / (R - 1)."""
    R = 6
    planes = torch.zeros(3, 1, R, R, dtype=F64)
    planes[0, 0] = torch.arange(R * R, dtype=F64).view(R, R)
    i, j = torch.meshgrid(torch.arange(R), torch.arange(R), indexing="ij")
    coords = lambda k: -1 + 2 * k.to(F64) / (R - 1)
    x = torch.stack([coords(j.flatten()), coords(i.flatten()), torch.zeros(R * R, dtype=F64)], -1)
    torch.testing.assert_close(sample_triplane(planes, x, "sum")[:, 0], planes[0, 0].flatten())


def test_bilinear_reproduces_a_linear_function():
    R = 7
    t = torch.linspace(-1, 1, R, dtype=F64)
    rows, cols = torch.meshgrid(t, t, indexing="ij")  # height coordinate, width coordinate
    planes = torch.stack([0.3 * cols - 0.8 * rows + 0.1, 1.5 * cols + 0.2 * rows, -0.4 * cols + rows - 2.0])[:, None]
    x = torch.rand(300, 3, dtype=F64) * 2 - 1
    expected = (0.3 * x[:, 0] - 0.8 * x[:, 1] + 0.1) + (1.5 * x[:, 0] + 0.2 * x[:, 2]) + (-0.4 * x[:, 1] + x[:, 2] - 2.0)
    torch.testing.assert_close(sample_triplane(planes, x, "sum")[:, 0], expected, rtol=0, atol=1e-13)


@pytest.mark.parametrize("reduce", REDUCTIONS)
def test_gradcheck_and_gradgradcheck(reduce):
    planes = torch.randn(3, 2, 4, 4, dtype=F64, requires_grad=True)
    x = (torch.rand(5, 3, dtype=F64) * 1.8 - 0.9).requires_grad_()
    fn = lambda p, q: sample_triplane(p, q, reduce)
    assert torch.autograd.gradcheck(fn, (planes, x))
    assert torch.autograd.gradgradcheck(fn, (planes, x))


@pytest.mark.parametrize("planes,x,reduce,match", [
    (torch.zeros(2, 4, 8, 8), torch.zeros(5, 3), "sum", r"planes must be a tensor \[3, F, R, R\], got \(2, 4, 8, 8\)"),
    (torch.zeros(3, 4, 8, 6), torch.zeros(5, 3), "sum", r"planes must be a tensor \[3, F, R, R\], got \(3, 4, 8, 6\)"),
    (torch.zeros(3, 4, 1, 1), torch.zeros(5, 3), "sum", r"R >= 2"),
    (torch.zeros(3, 4, 8, 8), torch.zeros(5, 2), "sum", r"x must be a float tensor \[P, 3\], got \(5, 2\)"),
    (torch.zeros(3, 4, 8, 8), torch.zeros(5, 3, dtype=F64), "sum", r"must share dtype and device"),
    (torch.zeros(3, 4, 8, 8), torch.zeros(5, 3), "mean", r"reduce must be one of .* got 'mean'"),
])
def test_bad_inputs_raise(planes, x, reduce, match):
    with pytest.raises(ValueError, match=match):
        sample_triplane(planes, x, reduce)
