"""Multi-resolution hash encoding: the torch and C++ backends against the naive reference (forward and
backward, dense and hashed levels, collisions, int32 and int64 indexing), gradcheck and gradgradcheck in
float64, trilinear exactness on a dense level, level resolutions, and input checks. C++ tests skip when
the extension cannot be built."""

import math

import pytest
import torch

from gen3d.ops import hash_encoding
from gen3d.ops.hash_encoding import (
    PRIMES,
    dense_levels,
    grid_resolutions,
    hash_encode,
    hash_encode_reference,
    index_dtype,
)

F64 = torch.float64


@pytest.fixture(params=["torch", "cpp"])
def backend(request):
    if request.param == "cpp" and hash_encoding.EXTENSION.load() is None:
        pytest.skip(f"the C++ hash encoding cannot be built here: {hash_encoding.EXTENSION.error}")
    return request.param


def _case(resolutions, T, F=3, P=300, dtype=F64, spread=1.0):
    tables = torch.randn(len(resolutions), T, F, dtype=dtype)
    x = torch.rand(P, 3, dtype=dtype) * spread + (1.0 - spread) / 2  # spread > 1 puts points outside [0, 1]
    return x, tables


def _grads(fn, x, tables, resolutions, seed=1):
    xl, tl = x.clone().requires_grad_(), tables.clone().requires_grad_()
    out = fn(xl, tl, resolutions)
    weights = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(seed))
    gx, gt = torch.autograd.grad((out * weights).sum(), (xl, tl))
    return out.detach(), gx, gt


@pytest.mark.parametrize("resolutions,T", [
    ([2, 4, 9, 30], 2**10),  # 3 dense levels, 1 hashed level with collisions (31^3 vertices > 1024 rows)
    ([3, 7], 1000),  # T not a power of two: int64 indices, h mod T
    ([1, 3], 7),  # every level hashed, even the coarsest
    ([5, 40, 300], 2**8),  # hashed levels with heavy collisions
])
def test_parity_with_reference(backend, resolutions, T):
    x, tables = _case(resolutions, T, spread=1.2)
    out, gx, gt = _grads(lambda a, b, r: hash_encode(a, b, r, backend=backend), x, tables, resolutions)
    ref, rgx, rgt = _grads(hash_encode_reference, x, tables, resolutions)
    assert out.shape == (x.shape[0], len(resolutions) * tables.shape[-1])
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gt, rgt, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx, rgx, rtol=1e-10, atol=1e-10)


def test_parity_float32_default_levels(backend):
    resolutions = grid_resolutions(16, 16, 512)
    x, tables = _case(resolutions, 2**12, F=2, P=2000, dtype=torch.float32)
    out, gx, gt = _grads(lambda a, b, r: hash_encode(a, b, r, backend=backend), x, tables, resolutions)
    ref, rgx, rgt = _grads(hash_encode_reference, x, tables, resolutions)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gt, rgt, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx, rgx, rtol=1e-4, atol=1e-3)  # |dx| ~ N_l, so absolute error ~ 512 ulp


def test_collisions_are_exercised():
    """The hashed level of the parity test really maps distinct vertices to one row."""
    n, T = 30, 2**10
    v = torch.cartesian_prod(*[torch.arange(n + 1)] * 3)  # every vertex of the level
    h = ((v[:, 0] * PRIMES[0]) ^ (v[:, 1] * PRIMES[1]) ^ (v[:, 2] * PRIMES[2])) & 0xFFFFFFFF
    rows = h % T
    assert not dense_levels([n], T)[0]
    assert rows.unique().numel() == T < v.shape[0]  # all rows used, shared by ~30 vertices each


def test_int32_and_int64_indexing_agree():
    """The widest int32 case (N (T - 1) just below 2^31) and an int64 one give the reference's answer."""
    assert index_dtype([16, 4096], 2**19) == torch.int32
    assert index_dtype([16, 8192], 2**19) == torch.int64
    for resolutions in ([16, 4096], [16, 8192]):
        x, tables = _case(resolutions, 2**19, F=1, P=200, dtype=torch.float32)
        torch.testing.assert_close(hash_encode(x, tables, resolutions, backend="torch"),
                                   hash_encode_reference(x, tables, resolutions), rtol=1e-6, atol=1e-6)


def test_gradcheck(backend):
    resolutions, T = [2, 3, 11], 64  # dense, dense, hashed
    x, tables = _case(resolutions, T, F=2, P=6)
    x.requires_grad_(), tables.requires_grad_()
    fn = lambda a, b: hash_encode(a, b, resolutions, backend=backend)
    assert torch.autograd.gradcheck(fn, (x, tables), eps=1e-6, atol=1e-7)


def test_gradgradcheck(backend):
    """Second derivatives (a loss on analytic normals trains the tables); cpp recomputes them with torch."""
    resolutions, T = [2, 11], 64
    x, tables = _case(resolutions, T, F=2, P=4)
    x.requires_grad_(), tables.requires_grad_()
    fn = lambda a, b: hash_encode(a, b, resolutions, backend=backend)
    assert torch.autograd.gradgradcheck(fn, (x, tables), eps=1e-6, atol=1e-6)


def test_double_backward_matches_reference(backend):
    """A loss on the gradient w.r.t. x (as on analytic normals) differentiated again: the cpp kernel's and the
    torch path's second derivatives against the reference's plain autograd, hashed levels included."""
    resolutions, T = [3, 9, 30], 2**9
    x0, tables0 = _case(resolutions, T, F=2, P=400, spread=1.1)

    def second(fn):
        x, tables = x0.clone().requires_grad_(), tables0.clone().requires_grad_()
        out = fn(x, tables, resolutions)
        w = torch.randn(out.shape, dtype=F64, generator=torch.Generator().manual_seed(1))
        (gx,) = torch.autograd.grad((out * w).sum().sin(), x, create_graph=True)
        v = torch.randn(gx.shape, dtype=F64, generator=torch.Generator().manual_seed(2))
        return torch.autograd.grad((gx * v).sum() + out.square().sum(), (x, tables))

    got = second(lambda a, b, r: hash_encode(a, b, r, backend=backend))
    for a, b in zip(got, second(hash_encode_reference)):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-8)  # second derivatives scale with N^2 ~ 1e3


def test_trilinear_reproduces_a_linear_function(backend):
    """A dense level storing g(v) = a . (v / N) + b at its vertices returns g(x) exactly at any x."""
    n, T = 7, 512  # 8^3 = 512 vertices: dense
    a, b = torch.tensor([0.7, -1.3, 2.1], dtype=F64), 0.25
    v = torch.stack(torch.meshgrid(*[torch.arange(n + 1, dtype=F64)] * 3, indexing="ij"), -1).reshape(-1, 3)
    rows = (v[:, 0] + v[:, 1] * (n + 1) + v[:, 2] * (n + 1) ** 2).long()  # the documented dense layout
    tables = torch.zeros(1, T, 1, dtype=F64)
    tables[0, rows, 0] = v @ a / n + b
    x = torch.rand(500, 3, dtype=F64)
    x[:4] = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.5, 0.0], [3 / 7, 1 / 7, 6 / 7]], dtype=F64)
    out = hash_encode(x, tables, [n], backend=backend)
    torch.testing.assert_close(out[:, 0], x @ a + b, rtol=0, atol=1e-13)


def test_points_outside_are_clamped(backend):
    resolutions, T = [4, 20], 256
    x, tables = _case(resolutions, T, P=50, spread=3.0)
    torch.testing.assert_close(hash_encode(x, tables, resolutions, backend=backend),
                               hash_encode(x.clamp(0, 1), tables, resolutions, backend=backend))


def test_empty_input(backend):
    out = hash_encode(torch.zeros(0, 3), torch.zeros(2, 16, 2), [2, 3], backend=backend)
    assert out.shape == (0, 4)


def test_grid_resolutions():
    res = grid_resolutions(16, 16, 512)
    growth = math.exp((math.log(512) - math.log(16)) / 15)
    assert res == [math.floor(16 * growth**level + 1e-6) for level in range(16)]
    assert res[0] == 16 and res[-1] == 512 and res == sorted(res)
    assert grid_resolutions(1, 8, 8) == [8]
    assert dense_levels([15, 16, 40], 2**12) == [True, False, False]  # 16^3 = 4096 vertices fit, 17^3 do not


def test_cpp_matches_torch_on_threads():
    """The C++ backward (levels over threads) does not depend on the number of threads."""
    if hash_encoding.EXTENSION.load() is None:
        pytest.skip(f"the C++ hash encoding cannot be built here: {hash_encoding.EXTENSION.error}")
    resolutions = [4, 9, 30, 64]
    x, tables = _case(resolutions, 2**9, F=2, P=500, dtype=torch.float32)
    previous = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(_grads(lambda a, b, r: hash_encode(a, b, r, backend="cpp"), x, tables, resolutions))
    finally:
        torch.set_num_threads(previous)
    for one, two in zip(*results):
        assert torch.equal(one, two)


@pytest.mark.parametrize("args,match", [
    ((torch.rand(5, 2), torch.zeros(2, 8, 2), [2, 3]), r"x must be a float tensor \[P, 3\], got \(5, 2\)"),
    ((torch.rand(5, 3), torch.zeros(8, 2), [2, 3]), r"tables must be a float tensor \[L, T, F\], got \(8, 2\)"),
    ((torch.rand(5, 3), torch.zeros(2, 8, 2), [2]), r"resolutions must be 2 ints >= 1"),
    ((torch.rand(5, 3), torch.zeros(2, 8, 2), [2, 0]), r"resolutions must be 2 ints >= 1"),
    ((torch.rand(5, 3), torch.zeros(2, 8, 2, dtype=F64), [2, 3]), r"must share dtype and device"),
    ((torch.randint(0, 2, (5, 3)), torch.zeros(2, 8, 2), [2, 3]), r"x must be a float tensor"),
])
def test_bad_inputs_raise(args, match):
    with pytest.raises(ValueError, match=match):
        hash_encode(*args)


def test_bad_backend_raises():
    with pytest.raises(ValueError, match=r"backend must be one of .* got 'gpu'"):
        hash_encode(torch.rand(5, 3), torch.zeros(2, 8, 2), [2, 3], backend="gpu")
    with pytest.raises(ValueError, match=r"base_resolution <= finest_resolution, got 32 and 16"):
        grid_resolutions(4, 32, 16)
