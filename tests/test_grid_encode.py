"""grid_encode: every backend against the reference (forward, coordinate and table gradients), the
explicit reference backward against autograd, gradcheck, opcheck, torch.compile, clamping, the
dense/hashed split, the CPU backward's determinism, clear errors, and the Triton sm_90 compile."""
from __future__ import annotations

import math
import os

import pytest
import torch
from conftest import NATIVE_BACKENDS, TOLERANCES, backend_device, torch_threads

from fastomni.ops import BackendUnavailable, use_backend
from fastomni.ops.grid_encode import grid_encode, grid_encode_op
from fastomni.reference import grid_encode as ref

OP = "grid_encode"
# (points N, dims D, features F): no points, one point, primes, F = 1, 3 (no specialized kernel), 4
SHAPES = [(0, 3, 2), (1, 1, 1), (7, 2, 3), (7, 4, 4), (1000, 3, 2), (1000, 4, 2), (13, 1, 2), (13, 2, 2)]


def _grid(dim, num_levels=3):
    """Levels of resolution 2 .. 24 with 2^(2D + 2) rows at most: coarse levels dense, fine ones hashed
    for every D."""
    return ref.grid_levels(dim, num_levels, 2, 24, 2 * dim + 2)


def _inputs(n, dim, feats, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    res, off = _grid(dim)
    x = torch.rand(n, dim, generator=g, dtype=torch.float64) * 1.2 - 0.1  # some clamped coordinates
    table = torch.randn(off[-1], feats, generator=g, dtype=torch.float64)
    return x.to(dtype=dtype, device=device), table.to(dtype=dtype, device=device), res, off


def _flat(res):
    return [r for level in res for r in level]


@pytest.mark.parametrize("dim", [1, 2, 3, 4])
def test_levels_mix_dense_and_hashed(dim):
    res, off = _grid(dim)
    dense = [math.prod(r + 1 for r in level) <= off[l + 1] - off[l] for l, level in enumerate(res)]
    assert any(dense) and not all(dense)


@pytest.mark.parametrize("backend", NATIVE_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(backend, dtype, shape):
    device = backend_device(OP, backend)
    x, table, res, off = _inputs(*shape, dtype, device)
    x.requires_grad_()
    table.requires_grad_()
    want = ref.grid_encode(x, table, res, off)
    with use_backend(backend):
        got = grid_encode(x, table, res, off)
    assert got.shape == want.shape == (shape[0], len(res) * shape[2])
    torch.testing.assert_close(got, want, **TOLERANCES[dtype])
    grad = torch.randn(want.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(want)
    want_gx, want_gt = torch.autograd.grad(want, (x, table), grad)
    got_gx, got_gt = torch.autograd.grad(got, (x, table), grad)
    torch.testing.assert_close(got_gx, want_gx, **TOLERANCES[dtype], msg="grad x")
    torch.testing.assert_close(got_gt, want_gt, **TOLERANCES[dtype], msg="grad table")


@pytest.mark.parametrize("dim", [1, 2, 3, 4])
def test_reference_backward_is_autograd(dim):
    x, table, res, off = _inputs(50, dim, 3, torch.float64, "cpu")
    x.requires_grad_()
    table.requires_grad_()
    out = ref.grid_encode(x, table, res, off)
    grad = torch.randn_like(out)
    want = torch.autograd.grad(out, (x, table), grad)
    got = ref.grid_encode_bwd_ref(grad, x.detach(), table.detach(), res, off)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOLERANCES[torch.float64])


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("dim", [2, 3])
def test_gradcheck(backend, dim):
    if backend != "reference":
        backend_device(OP, backend)
    x, table, res, off = _inputs(5, dim, 2, torch.float64, "cpu", seed=3)
    x = x.clamp(0.02, 0.98).requires_grad_()  # away from the clamp's kinks
    table.requires_grad_()
    assert torch.autograd.gradcheck(lambda p, t: grid_encode_op(p, t, _flat(res), off, backend), (x, table))


@pytest.mark.parametrize("backend", ["reference", *NATIVE_BACKENDS])
def test_opcheck(backend):
    device = "cpu" if backend == "reference" else backend_device(OP, backend)
    x, table, res, off = _inputs(6, 3, 2, torch.float32, device)
    torch.library.opcheck(grid_encode_op, (x.requires_grad_(), table.requires_grad_(), _flat(res), off, backend))


@pytest.mark.parametrize("backend", NATIVE_BACKENDS)
def test_compile_fullgraph(backend):
    device = backend_device(OP, backend)
    x, table, res, off = _inputs(9, 3, 2, torch.float32, device)
    x.requires_grad_()
    table.requires_grad_()

    def loss(x, table):
        return grid_encode(x, table, res, off).square().sum()

    with use_backend(backend):
        compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
        got = torch.autograd.grad(compiled(x, table), (x, table))
        want = torch.autograd.grad(loss(x, table), (x, table))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOLERANCES[torch.float32])


@pytest.mark.parametrize("backend", ["reference", *NATIVE_BACKENDS])
def test_clamping(backend):
    """Coordinates outside [0, 1] encode as the clamped point, with zero gradient along that axis."""
    device = "cpu" if backend == "reference" else backend_device(OP, backend)
    _, table, res, off = _inputs(0, 2, 2, torch.float64, device)
    x = torch.tensor([[-0.5, 0.3], [1.5, 0.7], [0.2, -1e-3], [0.0, 1.0]], dtype=torch.float64, device=device)
    x.requires_grad_()
    with use_backend(backend):
        out = grid_encode(x, table, res, off)
        clamped = grid_encode(x.detach().clamp(0, 1), table, res, off)
    torch.testing.assert_close(out, clamped, **TOLERANCES[torch.float64])
    (gx,) = torch.autograd.grad(out.sum(), x)
    outside = (x < 0) | (x > 1)
    assert bool((gx[outside] == 0).all())
    assert bool((gx[~outside] != 0).all())  # the boundary itself (0 and 1) keeps its gradient


def test_cpu_backward_is_deterministic():
    """The level-parallel scatter needs no atomics: grad_table is bit-identical for any thread count."""
    backend_device(OP, "cpu")
    x, table, res, off = _inputs(1000, 3, 2, torch.float32, "cpu")
    grad = torch.randn(1000, len(res) * 2, generator=torch.Generator().manual_seed(4))
    with torch_threads(1):
        one = torch.ops.fastomni_cpu.grid_encode_bwd(grad, x, table, _flat(res), off)
    with torch_threads(2):
        two = torch.ops.fastomni_cpu.grid_encode_bwd(grad, x, table, _flat(res), off)
        again = torch.ops.fastomni_cpu.grid_encode_bwd(grad, x, table, _flat(res), off)
    assert torch.equal(one[1], two[1]) and torch.equal(two[0], again[0]) and torch.equal(two[1], again[1])
    torch.testing.assert_close(one[0], two[0], **TOLERANCES[torch.float32])


def test_errors():
    x, table, res, off = _inputs(4, 3, 2, torch.float32, "cpu")
    with pytest.raises(TypeError, match="float32 or float64"):
        grid_encode(x.half(), table.half(), res, off)
    with pytest.raises(TypeError, match="differs"):
        grid_encode(x, table.double(), res, off)
    with pytest.raises(ValueError, match=r"\[N, D\] with D in 1..4"):
        grid_encode(torch.rand(4, 5), table, [(2,) * 5] * 3, off)
    with pytest.raises(ValueError, match="table must be"):
        grid_encode(x, table[:, 0], res, off)
    with pytest.raises(ValueError, match="offsets"):
        grid_encode(x, table, res, off[:-1])
    with pytest.raises(ValueError, match="strictly increasing"):
        grid_encode(x, table, res, [0, off[1], off[1], off[-1]])
    with pytest.raises(ValueError, match="resolutions"):
        grid_encode(x, table, [(2, 2)] * 3, off)
    with pytest.raises(ValueError, match="NaN"):
        grid_encode(torch.tensor([[0.1, float("nan"), 0.2]]), table, res, off)
    with use_backend("cuda"), pytest.raises(BackendUnavailable, match="CUDA|cuda tensors|not built"):
        grid_encode(x, table, res, off)
    backend_device(OP, "cpu")
    with pytest.raises(RuntimeError, match="strictly increasing"):  # a direct kernel call checks too
        torch.ops.fastomni_cpu.grid_encode_fwd(x, table, _flat(res), [0, off[1], off[1], off[-1]])
    with pytest.raises(RuntimeError, match=r"grad_out must be \[4, 6\]"):
        torch.ops.fastomni_cpu.grid_encode_bwd(torch.zeros(4, 5), x, table, _flat(res), off)


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="TRITON_INTERPRET=1 replaces the compiler")
@pytest.mark.parametrize("kernel", ["_grid_fwd_kernel", "_grid_bwd_kernel"])
@pytest.mark.parametrize("dtype", ["fp32", "fp64"])
def test_triton_compiles_for_sm80_and_sm90(arch, kernel, dtype):
    """A real compile to PTX and cubin for sm_80 and sm_90 (no GPU needed), within the shared memory a
    block may opt in to (A100: 166,912 B, H100: 232,448 B)."""
    triton = pytest.importorskip("triton", reason="triton is not installed")
    from fastomni.kernels import grid_encode as kernels
    from triton.backends.compiler import GPUTarget

    fn = getattr(kernels, kernel)
    constexprs = {"D": 3, "F": 2, "BLOCK_N": 64, "BLOCK_F": 2}
    signature = {name: "constexpr" if name in constexprs else "i32" if name in ("N", "L")
                 else "*i64" if name in ("levels", "primes") else f"*{dtype}" for name in fn.arg_names}
    compiled = triton.compile(triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                              target=GPUTarget("cuda", arch, 32))
    assert f".target sm_{arch}" in compiled.asm["ptx"] and compiled.asm["cubin"]
    assert compiled.metadata.shared <= {80: 166_912, 90: 232_448}[arch], compiled.metadata.shared
