"""stratified_sample: every backend against the reference (forward and backward), the explicit
reference backward against autograd, gradcheck, opcheck, torch.compile, dispatch errors,
batched == flat, and that jittered depths stay inside their intervals."""
from __future__ import annotations

import os

import pytest
import torch
from conftest import NATIVE_BACKENDS, TOLERANCES, backend_device

from fastomni.ops import BackendUnavailable, use_backend
from fastomni.ops.stratified_sample import stratified_sample, stratified_sample_op
from fastomni.reference import stratified_sample as ref

OP = "stratified_sample"
H, W = 13, 17
# (leading pixel dims, samples K): no rays, one ray with one sample, primes, OmniMotion's 32
SHAPES = [((0,), 5), ((1,), 1), ((3, 7), 13), ((2, 5), 32)]


def _pixels(lead, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(*lead, 2, generator=g, dtype=torch.float64) * torch.tensor([W - 1.0, H - 1.0])).to(
        dtype=dtype, device=device)


def _noise(lead, K, dtype, device, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(*lead, K, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)


@pytest.mark.parametrize("backend", NATIVE_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("jitter", [False, True])
def test_matches_reference(backend, dtype, shape, jitter):
    device = backend_device(OP, backend)
    lead, K = shape
    px = _pixels(lead, dtype, device).requires_grad_()
    noise = _noise(lead, K, dtype, device) if jitter else None
    want = ref.stratified_sample(px, H, W, K, 0.0, 2.0, noise)
    with use_backend(backend):
        got = stratified_sample(px, H, W, K, 0.0, 2.0, noise=noise)
    for name, a, b in zip(("points", "depths"), got, want):
        assert a.shape == b.shape, name
        torch.testing.assert_close(a, b, **TOLERANCES[dtype], msg=name)
    grad = torch.randn(want[0].shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(px)
    want_g = torch.autograd.grad(want[0], px, grad)[0]
    got_g = torch.autograd.grad(got[0], px, grad)[0]
    torch.testing.assert_close(got_g, want_g, **TOLERANCES[dtype])


@pytest.mark.parametrize("backend", NATIVE_BACKENDS)
def test_generator_gives_same_samples_on_every_backend(backend):
    device = backend_device(OP, backend)
    px = _pixels((4, 6), torch.float32, device)
    with use_backend("reference"):
        want = stratified_sample(px, H, W, 32, 0.0, 2.0, det=False, generator=torch.Generator(device).manual_seed(5))
    with use_backend(backend):
        got = stratified_sample(px, H, W, 32, 0.0, 2.0, det=False, generator=torch.Generator(device).manual_seed(5))
    torch.testing.assert_close(got[0], want[0], **TOLERANCES[torch.float32])


@pytest.mark.parametrize("backend", NATIVE_BACKENDS)
def test_jitter_stays_in_intervals(backend):
    """Depths jittered with noise in [0, 1) stay between the midpoints of the evenly spaced depths."""
    device = backend_device(OP, backend)
    K = 9
    noise = torch.tensor([0.0, 0.999999]).repeat_interleave(K).reshape(2, K).to(device=device, dtype=torch.float64)
    with use_backend(backend):
        _, depths = stratified_sample(torch.zeros(2, 2, dtype=torch.float64, device=device), H, W, K, 0.5, 2.5,
                                      noise=noise)
    grid = torch.linspace(0.5, 2.5, K, device=device).double()  # the original's float32 grid
    mids = 0.5 * (grid[1:] + grid[:-1])
    lower, upper = torch.cat([grid[:1], mids]), torch.cat([mids, grid[-1:]])
    torch.testing.assert_close(depths[0, :, 0], lower, atol=0, rtol=0)
    torch.testing.assert_close(depths[1, :, 0], lower + (upper - lower) * 0.999999, **TOLERANCES[torch.float64])
    assert bool((depths[1, :, 0] <= upper).all() and (depths[1, 1:, 0] > depths[0, 1:, 0]).all())


@pytest.mark.parametrize("backend", ["reference", *NATIVE_BACKENDS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("span", [(0.0, 2.0, 32), (0.5, 2.5, 9), (-1.3, 0.77, 13), (0.1, 3.7, 64)], ids=str)
def test_depths_are_the_original_float32_linspace(backend, dtype, span):
    """The deterministic depths are ``torch.linspace`` in float32 cast to the pixels' dtype, bit for
    bit, as the original's (float64 pixels included)."""
    device = "cpu" if backend == "reference" else backend_device(OP, backend)
    lo, hi, K = span
    with use_backend(backend):
        _, depths = stratified_sample(torch.zeros(3, 2, dtype=dtype, device=device), H, W, K, lo, hi)
    want = torch.linspace(lo, hi, K, device=device).to(dtype).expand(3, K)
    torch.testing.assert_close(depths[..., 0], want, atol=0, rtol=0)


def test_reference_backward_is_autograd():
    px = _pixels((3, 4), torch.float64, "cpu").requires_grad_()
    pts, _ = ref.stratified_sample(px, H, W, 7, 0.0, 2.0, _noise((3, 4), 7, torch.float64, "cpu"))
    grad = torch.randn_like(pts)
    torch.testing.assert_close(ref.stratified_sample_bwd_ref(grad, H, W), torch.autograd.grad(pts, px, grad)[0],
                               **TOLERANCES[torch.float64])


@pytest.mark.parametrize("backend", ["reference", *NATIVE_BACKENDS])
@pytest.mark.parametrize("jitter", [False, True])
def test_gradcheck(backend, jitter):
    device = "cpu" if backend == "reference" else backend_device(OP, backend)
    px = _pixels((5,), torch.float64, device).requires_grad_()
    noise = _noise((5,), 6, torch.float64, device) if jitter else None
    assert torch.autograd.gradcheck(lambda p: stratified_sample_op(p, noise, H, W, 6, 0.0, 2.0, backend), (px,))


@pytest.mark.parametrize("backend", ["reference", *NATIVE_BACKENDS])
@pytest.mark.parametrize("jitter", [False, True])
def test_opcheck(backend, jitter):
    device = "cpu" if backend == "reference" else backend_device(OP, backend)
    px = _pixels((6,), torch.float32, device).requires_grad_()
    noise = _noise((6,), 5, torch.float32, device) if jitter else None
    torch.library.opcheck(stratified_sample_op, (px, noise, H, W, 5, 0.0, 2.0, backend))


@pytest.mark.parametrize("backend", NATIVE_BACKENDS)
def test_compile_fullgraph(backend):
    device = backend_device(OP, backend)
    px = _pixels((2, 3), torch.float32, device).requires_grad_()
    noise = _noise((2, 3), 8, torch.float32, device)

    def loss(px):
        pts, depths = stratified_sample(px, H, W, 8, 0.0, 2.0, noise=noise)
        return pts.square().sum() + depths.sum()

    with use_backend(backend):
        compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
        got = torch.autograd.grad(compiled(px), px)[0]
        want = torch.autograd.grad(loss(px), px)[0]
    torch.testing.assert_close(got, want, **TOLERANCES[torch.float32])


def test_batched_equals_flat():
    backend_device(OP, "cpu")
    px, noise = _pixels((4, 6), torch.float32, "cpu"), _noise((4, 6), 11, torch.float32, "cpu")
    with use_backend("cpu"):
        batched = stratified_sample(px, H, W, 11, 0.0, 2.0, noise=noise)
        flat = stratified_sample(px.reshape(24, 2), H, W, 11, 0.0, 2.0, noise=noise.reshape(24, 11))
    for a, b in zip(flat, batched):
        torch.testing.assert_close(a.reshape(b.shape), b, atol=0, rtol=0)


def test_dispatch_errors():
    px = torch.rand(3, 2)
    with use_backend("cpu"), pytest.raises(BackendUnavailable, match="float32 or float64"):
        stratified_sample(px.half(), H, W, 4, 0.0, 2.0)
    with use_backend("cuda"), pytest.raises(BackendUnavailable, match="CUDA|cuda tensors|not built"):
        stratified_sample(px, H, W, 4, 0.0, 2.0)
    with pytest.raises(ValueError, match="not differentiable"):
        stratified_sample(px, H, W, 4, 0.0, 2.0, noise=torch.rand(3, 4, requires_grad=True))
    with pytest.raises(ValueError, match="noise"):
        stratified_sample(px, H, W, 4, 0.0, 2.0, noise=torch.rand(3, 5))
    with pytest.raises(ValueError, match="num_samples"):
        stratified_sample(px, H, W, 0, 0.0, 2.0)


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="TRITON_INTERPRET=1 replaces the compiler")
@pytest.mark.parametrize("kernel", ["_stratified_fwd_kernel", "_stratified_bwd_kernel"])
@pytest.mark.parametrize("dtype", ["fp32", "fp64"])
def test_triton_compiles_for_sm80_and_sm90(arch, kernel, dtype):
    """A real compile to PTX and cubin for sm_80 and sm_90 (no GPU needed), within the shared memory a
    block may opt in to (A100: 166,912 B, H100: 232,448 B)."""
    triton = pytest.importorskip("triton", reason="triton is not installed")
    from fastomni.kernels import stratified_sample as kernels
    from triton.backends.compiler import GPUTarget

    fn = getattr(kernels, kernel)
    constexprs = {name: value for name, value in {"JITTER": True, "BLOCK_R": 32, "BLOCK_K": 32}.items()
                  if name in fn.arg_names}
    signature = {name: "constexpr" if name in constexprs else "i32" if name in ("R", "K")
                 else "i32" if name in ("sx", "sy") else f"*{dtype}" for name in fn.arg_names}
    compiled = triton.compile(triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                              target=GPUTarget("cuda", arch, 32))
    assert f".target sm_{arch}" in compiled.asm["ptx"] and compiled.asm["cubin"]
    assert compiled.metadata.shared <= {80: 166_912, 90: 232_448}[arch], compiled.metadata.shared
