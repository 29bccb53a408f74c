"""affine_coupling: every backend against the reference (forward and backward), the explicit
reference backward against autograd, inverse(forward(y)) == y, gradcheck, opcheck, torch.compile,
dispatch errors, and NVPSimplified's use of the op (default configuration only).

The test layer has distinct widths (Pd=16, H0=32, hidden 64 and 16: powers of two, as the GPU
kernels require) so that no size is confused with another, and its ``s`` output is scaled so that part of the points hit the clamp at +-8."""
from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import NATIVE_BACKENDS, TOLERANCES, backend_device, torch_threads
from fastomni.nn import NVPSimplified
from fastomni.ops import BackendUnavailable, use_backend
from fastomni.ops.affine_coupling import affine_coupling, affine_coupling_bwd_op, affine_coupling_op
from fastomni.reference import affine_coupling as ref

OP = "affine_coupling"
PD, H0, HIDDEN, N_FREQ = 16, 32, (64, 16), 4
FULL_WIDTHS = (256, 256, 256, 256)  # the original's PD, H0 and hidden widths
# (frames n, points per frame P): no points, one point, primes, rows spanning several blocks of 256
SHAPES = [(1, 0), (3, 0), (1, 1), (3, 7), (2, 13), (3, 131)]


def _layer(n: int, P: int, dtype, device, seed: int = 0, widths=(PD, H0, *HIDDEN)) -> list:
    """Arguments ``y .. sigma`` of one coupling layer; weights scaled for O(1) activations."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype=dtype, device=device)

    pd, h0, *hidden = widths
    enc = 2 + 4 * N_FREQ
    out_w = rnd(2, hidden[-1], scale=hidden[-1] ** -0.5)
    out_w[0] *= 60  # s spreads over about +-10: the clamp at +-8 is active for some points
    return [rnd(n, P, 3, scale=0.5), rnd(n, h0, scale=0.3), rnd(pd, enc, scale=enc ** -0.5), rnd(pd, scale=0.1),
            rnd(h0, pd, scale=pd ** -0.5),
            [rnd(b, a, scale=a ** -0.5) for a, b in zip([h0, *hidden[:-1]], hidden)],
            [rnd(b, scale=0.1) for b in hidden], out_w, rnd(2, scale=0.1),
            (torch.pi * 2.0 ** torch.arange(N_FREQ, dtype=torch.float64)).to(dtype=dtype, device=device)]


def _leaves(args: list) -> list:
    """The differentiable tensors of ``args`` (all but sigma), flat."""
    return [*args[:5], *args[5], *args[6], args[7], args[8]]


def _assert_grads_close(got, want, dtype) -> None:
    for i, (a, b) in enumerate(zip(got, want)):
        # weight gradients sum over every point: compare relative to their scale
        scale = b.abs().max().item() if b.numel() else 0.0
        torch.testing.assert_close(a, b, atol=TOLERANCES[dtype]["atol"] * max(1.0, scale),
                                   rtol=TOLERANCES[dtype]["rtol"], msg=lambda m: f"gradient {i}: {m}")


@pytest.mark.parametrize("backend", NATIVE_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("inverse", [False, True])
def test_matches_reference(backend, dtype, shape, inverse):
    device = backend_device(OP, backend)
    n, P = shape
    args = _layer(n, P, dtype, device)
    for t in _leaves(args):
        t.requires_grad_()
    transformed = (n + P) % 3
    want = ref.affine_coupling(*args, transformed, inverse)
    with use_backend(backend):
        got = affine_coupling(*args, transformed, inverse)
    torch.testing.assert_close(got, want, **TOLERANCES[dtype])
    grad = torch.randn(want.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(want)
    _assert_grads_close(torch.autograd.grad(got, _leaves(args), grad), torch.autograd.grad(want, _leaves(args), grad),
                        dtype)


@pytest.mark.parametrize("backend", ["reference", *NATIVE_BACKENDS])
@pytest.mark.parametrize("dtype,inverse", [(torch.float32, False), (torch.float64, True)], ids=str)
def test_full_width_matches_reference(backend, dtype, inverse):
    """The original's widths (PD = H = 256), few points: forward and every gradient against the
    reference's autograd (``reference``: the custom op with its explicit backward)."""
    device = "cpu" if backend == "reference" else backend_device(OP, backend)
    args = _layer(2, 5, dtype, device, seed=11, widths=FULL_WIDTHS)
    for t in _leaves(args):
        t.requires_grad_()
    want = ref.affine_coupling(*args, 1, inverse)
    if backend == "reference":
        got = affine_coupling_op(*args, 1, inverse, 0.01, "reference")
    else:
        with use_backend(backend):
            got = affine_coupling(*args, 1, inverse)
    torch.testing.assert_close(got, want, **TOLERANCES[dtype])
    grad = torch.randn(want.shape, generator=torch.Generator().manual_seed(12), dtype=torch.float64).to(want)
    _assert_grads_close(torch.autograd.grad(got, _leaves(args), grad), torch.autograd.grad(want, _leaves(args), grad),
                        dtype)


def test_cpu_threads():
    """Rows split over several threads' chunks, weights requiring grad: the worker threads run below
    autograd as the caller does, and the result does not depend on their number."""
    backend_device(OP, "cpu")
    args = _layer(4, 300, torch.float64, "cpu", seed=3)
    for t in _leaves(args):
        t.requires_grad_()
    results = []
    for k in (1, 3):
        with torch_threads(k):
            with use_backend("cpu"):
                out = affine_coupling(*args, 0, False)
            results.append([out, *torch.autograd.grad(out.square().sum(), _leaves(args))])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, **TOLERANCES[torch.float64])


def test_reference_backward_is_autograd():
    args = _layer(3, 17, torch.float64, "cpu", seed=2)
    for inverse in (False, True):
        for transformed in range(3):
            leaves = [t.detach().requires_grad_() for t in _leaves(args)]
            full = [*leaves[:5], leaves[5:7], leaves[7:9], *leaves[9:], args[9]]
            out = ref.affine_coupling(*full, transformed, inverse)
            grad = torch.randn_like(out)
            want = torch.autograd.grad(out, leaves, grad)
            with torch.no_grad():
                g = ref.affine_coupling_bwd_ref(grad, *full, transformed, inverse)
            got = [*g[:5], *g[5], *g[6], *g[7:]]
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b, **TOLERANCES[torch.float64])


def test_clamp_is_exercised():
    """The test layer drives some s beyond +-8 (else the clamp's gradient would go untested)."""
    s, _ = ref.coupling_st(*_layer(3, 131, torch.float64, "cpu"), transformed=1)
    assert 0 < int((s.abs() == ref.S_CLAMP).sum()) < s.numel()


@pytest.mark.parametrize("backend", ["reference", *NATIVE_BACKENDS])
def test_inverse_of_forward(backend):
    device = "cpu" if backend == "reference" else backend_device(OP, backend)
    args = _layer(2, 29, torch.float64, device, seed=4)
    with use_backend(backend):
        for transformed in range(3):
            x = affine_coupling(*args, transformed, inverse=False)
            back = affine_coupling(x, *args[1:], transformed, inverse=True)
            torch.testing.assert_close(back, args[0], **TOLERANCES[torch.float64])


@pytest.mark.parametrize("backend", ["reference", *NATIVE_BACKENDS])
@pytest.mark.parametrize("inverse", [False, True])
def test_gradcheck(backend, inverse):
    """float64 gradcheck of the custom op; with ``reference`` it checks the explicit
    ``affine_coupling_bwd_ref`` (the custom op's backward calls it). The GPU kernels take
    power-of-two widths only, and are checked in fast mode (one random direction per input) so
    that the interpreter finishes in seconds."""
    device = "cpu" if backend == "reference" else backend_device(OP, backend)
    gpu = backend in ("triton", "cuda")
    args = _layer(2, 3, torch.float64, device, seed=5, widths=(16, 16, 16, 16) if gpu else (5, 6, 7, 4))
    leaves = [t.requires_grad_() for t in _leaves(args)]
    L = len(args[5])

    def fn(*t):
        return affine_coupling_op(*t[:5], list(t[5:5 + L]), list(t[5 + L:5 + 2 * L]), *t[5 + 2 * L:], args[9],
                                  2, inverse, 0.01, backend)

    assert torch.autograd.gradcheck(fn, leaves, fast_mode=gpu)


@pytest.mark.parametrize("backend", ["reference", *NATIVE_BACKENDS])
def test_opcheck(backend):
    device = "cpu" if backend == "reference" else backend_device(OP, backend)
    args = _layer(2, 5, torch.float32, device, seed=6)
    for t in _leaves(args):
        t.requires_grad_()
    torch.library.opcheck(affine_coupling_op, (*args, 1, True, 0.01, backend))


@pytest.mark.parametrize("backend", NATIVE_BACKENDS)
def test_compile_fullgraph(backend):
    device = backend_device(OP, backend)
    args = _layer(2, 9, torch.float32, device, seed=7)
    y = args[0].requires_grad_()

    def loss(y):
        return affine_coupling(y, *args[1:], 0, False).square().sum()

    with use_backend(backend):
        compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
        got = torch.autograd.grad(compiled(y), y)[0]
        want = torch.autograd.grad(loss(y), y)[0]
    torch.testing.assert_close(got, want, **TOLERANCES[torch.float32])


def test_dispatch_errors():
    args = _layer(2, 3, torch.float32, "cpu")
    half = [t.half() if isinstance(t, torch.Tensor) else [w.half() for w in t] for t in args]
    with use_backend("cpu"), pytest.raises(BackendUnavailable, match="float32 or float64"):
        affine_coupling(*half, 0, False)
    with use_backend("cuda"), pytest.raises(BackendUnavailable, match="CUDA|cuda tensors|not built"):
        affine_coupling(*args, 0, False)
    with pytest.raises(BackendUnavailable, match="cuda"):
        affine_coupling_op(*args, 0, False, 0.01, "cuda")
    with pytest.raises(ValueError, match="code_bias"):
        affine_coupling(args[0], args[1][:1], *args[2:], 0, False)
    with pytest.raises(ValueError, match="negative_slope"):
        affine_coupling(*args, 0, False, negative_slope=-0.1)
    with pytest.raises(ValueError, match="transformed"):
        affine_coupling(*args, 3, False)


def test_cuda_op_on_cpu_tensors_names_the_device(monkeypatch):
    """With the CUDA extension built (simulated here: CUDA "available", extension "loaded"), the cuda custom
    op given CPU tensors raises BackendUnavailable naming the device, and never reaches the dispatcher
    (which would raise NotImplementedError: the extension registers CUDA kernels only)."""
    from fastomni.ops import _checks

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(_checks, "_load", lambda module: None)
    args = _layer(2, 3, torch.float32, "cpu")
    with pytest.raises(BackendUnavailable, match="takes cuda tensors, got one on cpu"):
        affine_coupling_op(*args, 0, False, 0.01, "cuda")
    with pytest.raises(BackendUnavailable, match="takes cuda tensors, got one on cpu"):
        affine_coupling_bwd_op(args[0], *args, 0, False, 0.01, "cuda")


class _FakeProperties:
    def __init__(self, optin: int):
        self.shared_memory_per_block_optin = optin


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_check_compares_shared_memory_with_device(monkeypatch, dtype):
    """The cuda backend's check compares the backward's shared memory at the layer's widths with the
    device's opt-in limit (faked: an A100's 166,912 B, and 101,376 B of an sm_86 GPU); too little and
    it says why, so automatic dispatch falls back to triton."""
    from fastomni.ops import affine_coupling as op_module

    limit = {}
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: _FakeProperties(limit["optin"]))
    args = _layer(1, 1, dtype, "cpu", widths=FULL_WIDTHS)
    tensors = [*args[:5], *args[5], *args[6], *args[7:]]
    limit["optin"] = 166_912
    assert op_module._cuda_shared_memory(tensors) is None
    limit["optin"] = 101_376
    why = op_module._cuda_shared_memory(tensors)
    assert why is not None and "134272 B of shared memory" in why and "101376 B" in why


def test_cpu_kernel_checks_sizes():
    """A direct call of the C++ kernel with a mis-sized weight fails with the sizes, not a crash."""
    backend_device(OP, "cpu")
    args = _layer(2, 3, torch.float32, "cpu")
    args[4] = args[4][:, :-1]
    with pytest.raises(RuntimeError, match=r"input weight must be \[out, 16\]"):
        torch.ops.fastomni_cpu.affine_coupling_fwd(*args, 0, False, 0.01)


def _nvp(**kw) -> NVPSimplified:
    torch.manual_seed(0)
    cfg = dict(n_layers=6, feature_dims=8, hidden_size=[32, 32, 32], proj_dims=16, proj_type="fixed_positional_encoding",
               pe_freq=4, normalization=False)
    return NVPSimplified(**{**cfg, **kw}).double()


@pytest.mark.parametrize("backend", ["reference", *NATIVE_BACKENDS])
def test_nvp_uses_op_and_matches_original_path(backend):
    """The default configuration runs the op; it equals the original's concatenating layers and
    inverts."""
    device = "cpu" if backend == "reference" else backend_device(OP, backend)
    nvp = _nvp().to(device)
    assert all(layer.fused_weights() is not None for layer in nvp.layers1)
    t, feat = torch.rand(3, 1, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64)
    x = torch.rand(3, 5, 4, 3, dtype=torch.float64)
    t, feat, x = t.to(device), feat.to(device), x.to(device)
    with use_backend(backend):
        u = nvp.forward(t, feat, x)
        back = nvp.inverse(t, feat, u)
    want = x
    for i in nvp.layer_idx:
        code = nvp.code_projectors[i](feat)[:, None, None].expand(*x.shape[:3], -1)
        want, _ = nvp.layers1[i](code, want)
    torch.testing.assert_close(u, want, **TOLERANCES[torch.float64])
    torch.testing.assert_close(back, x, **TOLERANCES[torch.float64])


@pytest.mark.parametrize("kw", [dict(normalization=True), dict(proj_type="simple"),
                                dict(activation=torch.nn.ReLU)], ids=str)
def test_nvp_other_configurations_keep_module_path(kw):
    nvp = _nvp(**kw).eval()
    assert all(layer.fused_weights() is None for layer in nvp.layers1)
    t, feat, x = torch.rand(2, 1).double(), torch.randn(2, 8).double(), torch.rand(2, 7, 3).double()
    with use_backend("cpu"):  # no op runs, so even a backend without this configuration works
        back = nvp.inverse(t, feat, nvp.forward(t, feat, x))
    torch.testing.assert_close(back, x, **TOLERANCES[torch.float64])


@pytest.fixture(scope="module")
def cuda_emulation(tmp_path_factory):
    """The CUDA kernels compiled as plain C++, one thread per block (tests/affine_coupling_cuda_emulation.cpp);
    nvcc compiles it as host code (``-x c++``) so that the CUDA headers are found."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc (the CUDA toolkit) is not installed")
    here = Path(__file__).resolve().parent
    lib = tmp_path_factory.mktemp("cuda_emulation") / "affine_coupling_cuda_emulation.so"
    subprocess.run([nvcc, "-x", "c++", "-std=c++20", "-O1", "-shared", "-Xcompiler", "-fPIC", "-w",
                    "-I", str(here.parent / "csrc"), str(here / "affine_coupling_cuda_emulation.cpp"), "-o", str(lib)],
                   check=True)
    return ctypes.CDLL(str(lib))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape,widths", [((1, 1), (PD, H0, *HIDDEN)), ((3, 37), (PD, H0, *HIDDEN)),
                                          ((2, 37), FULL_WIDTHS)], ids=str)
@pytest.mark.parametrize("inverse", [False, True])
def test_cuda_kernels_emulated_match_reference(cuda_emulation, dtype, shape, widths, inverse):
    """The CUDA kernels' indexing and math (not their synchronisation, which needs a GPU), also at
    the original's widths; no block touches shared memory past what its launch asks for."""
    n, P = shape
    args = _layer(n, P, dtype, "cpu", seed=8, widths=widths)
    y, code_bias, proj_w, proj_b, in_w, hidden_w, hidden_b, out_w, out_b, sigma = args
    transformed = P % 3
    weights = [proj_w, proj_b, in_w, hidden_w[0], hidden_b[0], hidden_w[1], hidden_b[1], out_w, out_b, sigma]
    sizes = (ctypes.c_int64 * 9)(n, P, N_FREQ, *widths, transformed, int(inverse))

    def ptrs(ts):
        return (ctypes.c_void_p * len(ts))(*[t.data_ptr() for t in ts])

    is_double, slope = int(dtype == torch.float64), ctypes.c_double(0.01)
    out = torch.empty_like(y)
    assert cuda_emulation.emulate_fwd(is_double, ctypes.c_void_p(y.data_ptr()), ctypes.c_void_p(code_bias.data_ptr()),
                                      ptrs(weights), sizes, slope, ctypes.c_void_p(out.data_ptr())) == 0
    torch.testing.assert_close(out, ref.affine_coupling(*args, transformed, inverse), **TOLERANCES[dtype])

    grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64).to(dtype)
    # the kernel's gradient order: y, code_bias, proj_w, proj_b, in_w, w1, b1, w2, b2, out_w, out_b
    got = [torch.empty_like(y)] + [torch.zeros_like(t) for t in [code_bias, proj_w, proj_b, in_w, hidden_w[0],
                                                                  hidden_b[0], hidden_w[1], hidden_b[1], out_w, out_b]]
    assert cuda_emulation.emulate_bwd(is_double, ctypes.c_void_p(grad.data_ptr()), ctypes.c_void_p(y.data_ptr()),
                                      ctypes.c_void_p(code_bias.data_ptr()), ptrs(weights), sizes, slope,
                                      ptrs(got)) == 0
    g = ref.affine_coupling_bwd_ref(grad, *args, transformed, inverse)
    _assert_grads_close(got, [*g[:5], g[5][0], g[6][0], g[5][1], g[6][1], g[7], g[8]], dtype)


# Per-block shared memory a kernel may opt in to: A100 (sm_80) and H100/H200 (sm_90).
SHARED_LIMIT = {80: 166_912, 90: 232_448}
# Bytes of per-thread stack allowed in the Triton kernels at widths 256: the compiles' values (Triton 3.8)
# plus a margin of 16 B (float32) or 32 B (float64), so that a regression fails. 32 B of it is the
# frame of sin/cos's range reduction (48 B in float64), the rest register spills (ptxas -v: none on
# sm_90 but in the float64 bwd kernel, 288 B; on sm_80, 20-24 B in the float32 fwd and bwd_recompute,
# 368 B in the float64 bwd).
# (The earlier one-kernel backward, with weight-gradient accumulators and atomics: 255 registers and
# 568 / 1,040 B (float32 / float64) of stack on sm_90, 840 / 2,112 B on sm_80.)
STACK_BOUND = {  # (kernel, dtype, arch): bytes
    ("fwd", torch.float32, 80): 56 + 16, ("fwd", torch.float32, 90): 32 + 16,
    ("fwd", torch.float64, 80): 48 + 32, ("fwd", torch.float64, 90): 48 + 32,
    ("bwd_recompute", torch.float32, 80): 56 + 16, ("bwd_recompute", torch.float32, 90): 32 + 16,
    ("bwd_recompute", torch.float64, 80): 48 + 32, ("bwd_recompute", torch.float64, 90): 48 + 32,
    ("bwd", torch.float32, 80): 32 + 16, ("bwd", torch.float32, 90): 32 + 16,
    ("bwd", torch.float64, 80): 384 + 32, ("bwd", torch.float64, 90): 296 + 32,
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_shared_memory_formula_matches_kernels(cuda_emulation, dtype):
    """The backend check's shared-memory formula is the kernels' (shared_bytes in the .cuh, compiled)."""
    from fastomni.ops.affine_coupling import cuda_shared_bytes

    cuda_emulation.emulate_shared_bytes.restype = ctypes.c_int64
    for F, widths in [(4, FULL_WIDTHS), (4, (PD, H0, *HIDDEN)), (10, (16, 16, 16, 16)), (2, (128, 256, 64, 32))]:
        sizes = (ctypes.c_int64 * 9)(1, 1, F, *widths, 0, 0)
        for backward in (False, True):
            assert cuda_shared_bytes(dtype, F, widths, backward) == cuda_emulation.emulate_shared_bytes(
                int(dtype == torch.float64), sizes, int(backward))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("arch", [80, 90])
def test_cuda_shared_memory_fits_at_full_width(dtype, arch):
    """At the original's widths (256, F = 4) both CUDA kernels fit the per-block opt-in limit of an
    A100 and of an H100 (the backward asked for 200,064 B before, over sm_80's 166,912). The other
    CUDA kernels use static shared memory only, which ptxas checks at compile time (fastomni_cuda_check)."""
    from fastomni.ops.affine_coupling import cuda_shared_bytes

    for backward in (False, True):
        assert cuda_shared_bytes(dtype, N_FREQ, FULL_WIDTHS, backward) <= SHARED_LIMIT[arch]


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="TRITON_INTERPRET=1 replaces the compiler")
@pytest.mark.parametrize("kernel", ["fwd", "bwd_recompute", "bwd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("arch", [80, 90])
def test_triton_compiles_within_limits(kernel, dtype, arch):
    """A real compile to PTX and cubin for sm_80 and sm_90 at OmniMotion's widths (no GPU needed): shared
    memory within the block's opt-in limit (more compiles, then fails at launch), stack (register spills)
    within STACK_BOUND, no atomics (the backward's weight gradients are torch ``mm``s over its per-point
    buffers: deterministic), and a float64 kernel's LeakyReLU slope an exact float64 literal."""
    import re
    import subprocess

    triton = pytest.importorskip("triton", reason="triton is not installed")
    from fastomni.kernels import affine_coupling as kernels
    from triton import knobs
    from triton.backends.compiler import GPUTarget

    fn = getattr(kernels, f"_coupling_{kernel}_kernel")
    w = torch.empty(256, 256)
    cfg = kernels.config(kernel, dtype, w[:, :18], w, [w, w], torch.empty(4), transformed=1, inverse=False)
    ty = {torch.float32: "fp32", torch.float64: "fp64"}[dtype]
    signature = {name: "constexpr" if name in cfg else "i32" if name == "P" else f"*{ty}" for name in fn.arg_names}
    compiled = triton.compile(triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=cfg),
                              target=GPUTarget("cuda", arch, 32), options=kernels.launch_options(kernel, dtype))
    ptx = compiled.asm["ptx"]
    assert f".target sm_{arch}" in ptx and compiled.asm["cubin"]
    assert compiled.metadata.shared <= SHARED_LIMIT[arch], compiled.metadata.shared
    if dtype == torch.float64:  # 0.01 as a double, not 0.01f widened (0d3F847AE140000000)
        assert "0d3F847AE147AE147B" in ptx and "0d3F847AE140000000" not in ptx
    atomics = re.findall(r"\b(?:atom|red)\.[\w.]+", ptx)
    assert not atomics, set(atomics)

    cubin = Path(os.environ.get("TMPDIR", "/tmp")) / f"fastomni_coupling_{kernel}_{ty}_{arch}_{os.getpid()}.cubin"
    cubin.write_bytes(compiled.asm["cubin"])
    try:
        usage = subprocess.run([knobs.nvidia.cuobjdump.path, "--dump-resource-usage", str(cubin)], check=True,
                               capture_output=True, text=True).stdout
    finally:
        cubin.unlink()
    stack = int(re.search(r"STACK:(\d+)", usage).group(1))
    bound = STACK_BOUND[kernel, dtype, arch]
    assert stack <= bound, f"{stack} B of stack (spills) per thread, bound {bound}"
