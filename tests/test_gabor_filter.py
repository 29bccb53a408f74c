"""gabor_filter: gabor_step and gabor_net on every backend against the reference (forward and
backward), the explicit reference backwards against autograd, gradcheck, opcheck, torch.compile,
dispatch errors, and GaborNet (output_act, bias=False) on the fused op."""
from __future__ import annotations

import math
import os

import pytest
import torch

from conftest import NATIVE_BACKENDS, TOLERANCES, backend_device
from fastomni.nn.mfn import GaborNet
from fastomni.ops import BackendUnavailable, use_backend
from fastomni.ops.gabor_filter import gabor_net, gabor_net_op, gabor_step, gabor_step_op
from fastomni.reference import gabor_filter as ref

OP = "gabor_filter"


# GaborNet's input_scale is 256: sin arguments reach the hundreds and dL/dx sums terms that large
# with cancellation, beyond float32 rtol of either side; gradient tests use a smaller scale and
# test_realistic_scale_forward the original one.
SCALE, REAL_SCALE = 32.0, 256.0


def _filters(n_filters, n_in, H, dtype, device, g, scale, alpha=3.0):
    """GaborNet's initialisation, with input_scale ``scale``."""
    fw, fb, mu, gamma = [], [], [], []
    for _ in range(n_filters):
        gam = torch.distributions.Gamma(alpha / n_filters, 1.0).sample((H,)).double() + 0.05
        w = (torch.rand(H, n_in, generator=g, dtype=torch.float64) * 2 - 1) / math.sqrt(n_in)
        fw.append(w * scale / math.sqrt(n_filters) * gam.sqrt()[:, None])
        fb.append((torch.rand(H, generator=g, dtype=torch.float64) * 2 - 1) * math.pi)
        mu.append(torch.rand(H, n_in, generator=g, dtype=torch.float64) * 2 - 1)
        gamma.append(gam)
    return [[t.to(dtype=dtype, device=device) for t in ts] for ts in (fw, fb, mu, gamma)]


def _net_params(N, n_in, H, O, L, bias, dtype, device, seed=0, scale=SCALE):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # the Gamma sampler
    x = (torch.rand(N, n_in, generator=g, dtype=torch.float64) * 2 - 1).to(dtype=dtype, device=device)
    fw, fb, mu, gamma = _filters(L + 1, n_in, H, dtype, device, g, scale)
    b = 1 / math.sqrt(H)

    def u(*shape):
        return ((torch.rand(*shape, generator=g, dtype=torch.float64) * 2 - 1) * b).to(dtype=dtype, device=device)

    lw = [u(H, H) for _ in range(L)]
    lb = [u(H) for _ in range(L)] if bias else []
    return x, fw, fb, mu, gamma, lw, lb, u(O, H), u(O)


def _leaves(params):
    x, *lists, ow, ob = params
    return [x, *(t for ts in lists for t in ts), ow, ob]


def _assert_grads_close(got, want, dtype, names):
    for name, a, b in zip(names, got, want):
        torch.testing.assert_close(a, b, **TOLERANCES[dtype], msg=lambda m, name=name: f"grad {name}: {m}")


def _assert_net_close(got, want, leaves, dtype, seed):
    """A GaborNet's output and every leaf's gradient (for one random output gradient) against the
    reference's."""
    torch.testing.assert_close(got, want, **TOLERANCES[dtype])
    grad = torch.randn(want.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(want)
    want_g = torch.autograd.grad(want, leaves, grad, allow_unused=True)
    got_g = torch.autograd.grad(got, leaves, grad, allow_unused=True)
    _assert_grads_close(got_g, want_g, dtype, [f"leaf {i}" for i in range(len(leaves))])


# (N, in, H, O, L, lin bias): no points, one point on a one-input net, primes, more than one
# 1024-row chunk of the native backends, a single filter (L = 0), a feature_mlp-like net
NET_SHAPES = [(0, 3, 8, 4, 2, True), (1, 1, 16, 3, 1, True), (13, 3, 17, 4, 3, False), (1031, 3, 11, 2, 2, True),
              (7, 3, 5, 2, 0, True), (5, 1, 32, 7, 2, True)]


@pytest.mark.parametrize("backend", NATIVE_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", NET_SHAPES, ids=str)
@pytest.mark.parametrize("recompute", [False, True])
def test_net_matches_reference(backend, dtype, shape, recompute):
    device = backend_device(OP, backend)
    params = _net_params(*shape, dtype, device)
    leaves = [t.requires_grad_() for t in _leaves(params)]
    want = ref.gabor_net(*params)
    with use_backend(backend):
        got = gabor_net(*params, recompute=recompute)
    _assert_net_close(got, want, leaves, dtype, seed=1)


# the original's two GaborNets (N, in, H, O, L, lin bias): colour (512 wide) and feature (256 wide)
FULL_WIDTH_NETS = [(5, 3, 512, 4, 3, True), (5, 1, 256, 128, 2, True)]


@pytest.mark.parametrize("backend", ["reference", *NATIVE_BACKENDS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", FULL_WIDTH_NETS, ids=str)
def test_full_width_net_matches_reference(backend, dtype, shape):
    """The original's widths, few points: forward and every gradient against the reference's
    autograd (``reference``: the custom op with its explicit backward)."""
    device = "cpu" if backend == "reference" else backend_device(OP, backend)
    params = _net_params(*shape, dtype, device, seed=3)
    leaves = [t.requires_grad_() for t in _leaves(params)]
    want = ref.gabor_net(*params)
    if backend == "reference":
        got, _ = gabor_net_op(*params[:7], *params[7:], False, "reference")
    else:
        with use_backend(backend):
            got = gabor_net(*params, recompute=True)
    _assert_net_close(got, want, leaves, dtype, seed=4)


@pytest.mark.parametrize("backend", NATIVE_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_realistic_scale_forward(backend, dtype):
    """The original's input_scale (sin arguments in the hundreds): the range reduction holds."""
    device = backend_device(OP, backend)
    params = _net_params(67, 3, 40, 4, 3, True, dtype, device, scale=REAL_SCALE)
    x, fw, fb = params[:3]
    assert (x @ fw[0].T + fb[0]).abs().max() > 100  # sin arguments many periods out
    with use_backend(backend):
        got = gabor_net(*params)
    torch.testing.assert_close(got, ref.gabor_net(*params), **TOLERANCES[dtype])


# (N, in, H, H_prev, mode): mode "bare" (first filter), "bias", "nobias"
STEP_SHAPES = [(0, 3, 8, 8, "bias"), (1, 1, 5, 3, "bare"), (1, 3, 7, 7, "nobias"), (29, 3, 19, 23, "bias"),
               (1031, 1, 13, 13, "nobias"), (37, 3, 31, 31, "bare")]


def _step_params(N, n_in, H, H_prev, mode, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x = (torch.rand(N, n_in, generator=g, dtype=torch.float64) * 2 - 1).to(dtype=dtype, device=device)
    (w,), (b,), (mu,), (gamma,) = _filters(1, n_in, H, dtype, device, g, SCALE)
    if mode == "bare":
        return x, w, b, mu, gamma, None, None, None
    prev = torch.randn(N, H_prev, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)
    lw = (torch.randn(H, H_prev, generator=g, dtype=torch.float64) / math.sqrt(H_prev)).to(dtype=dtype, device=device)
    lb = torch.randn(H, generator=g, dtype=torch.float64).to(dtype=dtype, device=device) if mode == "bias" else None
    return x, w, b, mu, gamma, prev, lw, lb


@pytest.mark.parametrize("backend", NATIVE_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", STEP_SHAPES, ids=str)
def test_step_matches_reference(backend, dtype, shape):
    device = backend_device(OP, backend)
    params = _step_params(*shape, dtype, device)
    leaves = [t.requires_grad_() for t in params if t is not None]
    want = ref.gabor_step(*params)
    with use_backend(backend):
        got = gabor_step(*params)
    torch.testing.assert_close(got, want, **TOLERANCES[dtype])
    grad = torch.randn(want.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(want)
    want_g = torch.autograd.grad(want, leaves, grad)
    got_g = torch.autograd.grad(got, leaves, grad)
    _assert_grads_close(got_g, want_g, dtype, [f"input {i}" for i in range(len(leaves))])


@pytest.mark.parametrize("mode", ["bare", "bias", "nobias"])
def test_reference_step_backward_is_autograd(mode):
    params = _step_params(9, 3, 6, 5, mode, torch.float64, "cpu")
    leaves = [t.requires_grad_() for t in params if t is not None]
    out = ref.gabor_step(*params)
    grad = torch.randn_like(out)
    auto = torch.autograd.grad(out, leaves, grad)
    explicit = [g for g in ref.gabor_step_bwd_ref(grad, *params) if g is not None]
    assert len(explicit) == len(auto)
    _assert_grads_close(explicit, auto, torch.float64, [f"input {i}" for i in range(len(leaves))])


@pytest.mark.parametrize("bias", [True, False])
def test_reference_net_backward_is_autograd(bias):
    params = _net_params(11, 3, 6, 2, 2, bias, torch.float64, "cpu", scale=4.0)
    leaves = [t.requires_grad_() for t in _leaves(params)]
    out = ref.gabor_net(*params)
    grad = torch.randn_like(out)
    auto = torch.autograd.grad(out, leaves, grad)
    dx, *lists, dow, dob = ref.gabor_net_bwd_ref(grad, *params)
    explicit = [dx, *(g for gs in lists for g in gs), dow, dob]
    assert len(explicit) == len(auto)
    _assert_grads_close(explicit, auto, torch.float64, [f"leaf {i}" for i in range(len(leaves))])


def _gradcheck_device(backend):
    return "cpu" if backend == "reference" else backend_device(OP, backend)


@pytest.mark.parametrize("backend", ["reference", *NATIVE_BACKENDS])
@pytest.mark.parametrize("mode", ["bare", "bias"])
def test_step_gradcheck(backend, mode):
    """float64 gradcheck of the step op (for ``reference``: its explicit backward)."""
    params = list(_step_params(4, 3, 5, 3, mode, torch.float64, _gradcheck_device(backend)))
    params[1] = params[1] / 64  # moderate sin arguments: finite differences stay accurate
    leaves = [t.requires_grad_() for t in params if t is not None]
    slots = [i for i, t in enumerate(params) if t is not None]

    def f(*ts):
        args = list(params)
        for i, t in zip(slots, ts):
            args[i] = t
        return gabor_step_op(*args, backend)

    assert torch.autograd.gradcheck(f, leaves, fast_mode=backend == "triton")


@pytest.mark.parametrize("backend", ["reference", *NATIVE_BACKENDS])
@pytest.mark.parametrize("recompute", [False, True])
def test_net_gradcheck(backend, recompute):
    """float64 gradcheck of the whole-net op, with saved lins and recomputing them."""
    params = _net_params(5, 3, 4, 2, 2, True, torch.float64, _gradcheck_device(backend), scale=4.0)
    leaves = [t.requires_grad_() for t in _leaves(params)]
    sizes = [1, 3, 3, 3, 3, 2, 2, 1, 1]

    def f(*ts):
        it, groups = iter(ts), []
        for n in sizes:
            groups.append([next(it) for _ in range(n)])
        (x,), *lists, (ow,), (ob,) = groups
        return gabor_net_op(x, *lists, ow, ob, not recompute, backend)[0]

    assert torch.autograd.gradcheck(f, leaves, fast_mode=backend == "triton")


@pytest.mark.parametrize("backend", ["reference", *NATIVE_BACKENDS])
def test_opcheck(backend):
    device = _gradcheck_device(backend)
    x, fw, fb, mu, gamma, lw, lb, ow, ob = _net_params(6, 3, 8, 3, 2, True, torch.float32, device, scale=8.0)
    for t in (x, *fw, ow):
        t.requires_grad_()
    for save in (True, False):
        torch.library.opcheck(gabor_net_op, (x, fw, fb, mu, gamma, lw, lb, ow, ob, save, backend))
    prev = torch.randn(6, 8, device=device, requires_grad=True)
    torch.library.opcheck(gabor_step_op, (x, fw[1], fb[1], mu[1], gamma[1], prev, lw[0], lb[0], backend))
    torch.library.opcheck(gabor_step_op, (x, fw[0], fb[0], mu[0], gamma[0], None, None, None, backend))


@pytest.mark.parametrize("backend", NATIVE_BACKENDS)
def test_compile_fullgraph(backend):
    device = backend_device(OP, backend)
    params = _net_params(9, 3, 16, 4, 2, True, torch.float32, device)
    x = params[0].requires_grad_()
    net_params = params[1:]

    def loss(x):
        y = gabor_net(x, *net_params)
        bank = gabor_step(x, net_params[0][0], net_params[1][0], net_params[2][0], net_params[3][0])
        return y.square().sum() + bank.sum()

    with use_backend(backend):
        compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
        got = torch.autograd.grad(compiled(x), x)[0]
        want = torch.autograd.grad(loss(x), x)[0]
    torch.testing.assert_close(got, want, **TOLERANCES[torch.float32])


@pytest.mark.parametrize("backend", NATIVE_BACKENDS)
@pytest.mark.parametrize("bias,output_act", [(True, False), (False, True)])
def test_gabornet_module(backend, bias, output_act):
    """GaborNet on the fused op equals the reference backend, leading dims kept, bias-free linears
    and the sin output activation included."""
    device = backend_device(OP, backend)
    torch.manual_seed(0)
    net = GaborNet(3, 24, 5, n_layers=2, alpha=3, bias=bias, output_act=output_act).to(device)
    x = torch.rand(2, 7, 3, device=device) * 2 - 1
    with use_backend("reference"):
        want = net(x)
        want_g = torch.autograd.grad(want.square().sum(), list(net.parameters()))
    with use_backend(backend):
        got = net(x)
        got_g = torch.autograd.grad(got.square().sum(), list(net.parameters()))
    assert got.shape == (2, 7, 5)
    torch.testing.assert_close(got, want, **TOLERANCES[torch.float32])
    _assert_grads_close(got_g, want_g, torch.float32, [n for n, _ in net.named_parameters()])


def test_save_lin_flag():
    """lins [L, N, H] are kept only when asked (training without recompute)."""
    backend_device(OP, "cpu")
    params = _net_params(6, 3, 8, 3, 2, True, torch.float32, "cpu")
    assert gabor_net_op(*params, False, "cpu")[1].shape == (0, 6, 8)
    assert gabor_net_op(*params, True, "cpu")[1].shape == (2, 6, 8)


def test_dispatch_errors():
    x, fw, fb, mu, gamma, lw, lb, ow, ob = _net_params(3, 3, 4, 2, 1, True, torch.float32, "cpu")
    with use_backend("cpu"), pytest.raises(BackendUnavailable, match="float32 or float64"):
        gabor_net(x.half(), [w.half() for w in fw], [b.half() for b in fb], [m.half() for m in mu],
                  [g.half() for g in gamma], [w.half() for w in lw], [b.half() for b in lb], ow.half(), ob.half())
    with use_backend("cuda"), pytest.raises(BackendUnavailable, match="CUDA|cuda tensors|not built"):
        gabor_net(x, fw, fb, mu, gamma, lw, lb, ow, ob)
    with pytest.raises(BackendUnavailable, match="'nope'"):
        gabor_net_op(x, fw, fb, mu, gamma, lw, lb, ow, ob, False, "nope")
    with pytest.raises(TypeError, match="dtype|float64"):
        gabor_net(x.double(), fw, fb, mu, gamma, lw, lb, ow, ob)
    with pytest.raises(ValueError, match="lin_bias"):
        gabor_net(x, fw, fb, mu, gamma, lw, lb * 2, ow, ob)
    with pytest.raises(ValueError, match=r"filter 1 mu must have shape \[4, 3\]"):
        gabor_net(x, fw, fb, [mu[0], mu[1][:, :2]], gamma, lw, lb, ow, ob)
    with pytest.raises(ValueError, match="prev and lin_weight"):
        gabor_step(x, fw[0], fb[0], mu[0], gamma[0], prev=torch.rand(3, 4))
    backend_device(OP, "cpu")
    # the C++ kernels check what a direct call could get wrong, naming the sizes
    with pytest.raises(RuntimeError, match=r"lin_weight 0 must be \[4, 4\], got \[4, 5\]"):
        gabor_net_op(x, fw, fb, mu, gamma, [torch.rand(4, 5)], lb, ow, ob, False, "cpu")
    with pytest.raises(RuntimeError, match=r"grad_out must be \[3, 2\]"):
        torch.ops.fastomni_cpu.gabor_net_bwd(torch.rand(3, 3), x, fw, fb, mu, gamma, lw, lb, ow, ob,
                                             torch.empty(0))


def test_huge_and_non_finite_sin_arguments():
    """sin/cos arguments beyond the CPU kernel's fast range (|z| >= 2^16 pi/2 ~ 102944), and NaN
    and inf inputs, give torch.sin/cos's values (NaN in, NaN out), forward and backward. Weights are
    powers of two and the bias 0, so z = x w is exact on every path; gamma is tiny, so the envelope
    is ~1 where |x| is finite. (The Triton kernel's float32 sin/cos has the same range limit and no
    fallback yet: under the interpreter the 1e30 row gives NaN, not 0.)"""
    backend = "cpu"
    device = backend_device(OP, backend)
    x = torch.tensor([0.5, -3.0, 100.0, 100.5, 1.0e5, 1.03e5, -2.5e7, 1.0e6, 3.3e5, 1e30, math.nan, math.inf,
                      -math.inf], dtype=torch.float32, device=device)[:, None].requires_grad_()
    w = torch.tensor([1.0, 2.0, 1024.0, 2048.0, 0.0], device=device)[:, None]  # z = 102400 (fast), 204800 (not)
    params = [w, torch.zeros(5, device=device), torch.zeros(5, 1, device=device),
              torch.full((5,), 1e-30, device=device)]
    want = ref.gabor_step(x, *params)
    with use_backend(backend):
        got = gabor_step(x, *params)
    assert got[-3:, :4].isnan().all() and not got[:-3].isnan().any()
    torch.testing.assert_close(got, want, **TOLERANCES[torch.float32], equal_nan=True)
    grad = torch.ones_like(want)
    finite = slice(0, -3)  # the NaN rows' gradients are NaN on every side
    want_g = torch.autograd.grad(want, x, grad)[0]
    got_g = torch.autograd.grad(got, x, grad)[0]
    torch.testing.assert_close(got_g[finite], want_g[finite], **TOLERANCES[torch.float32])
    assert got_g[-3:].isnan().all()


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="TRITON_INTERPRET=1 replaces the compiler")
@pytest.mark.parametrize("arch,shared_limit", [(80, 166_912), (90, 232_448)])
def test_triton_compiles_for_sm80_and_sm90(arch, shared_limit):
    """A real compile to PTX and cubin for sm_80 and sm_90 of every Triton kernel (no GPU needed), within
    the per-block shared memory of an A100 / H100 (the tiles do not depend on the width, 512 included),
    the float32 linears on tensor cores (tf32x3: ``mma``/``wgmma``, no FMA-only dot)."""
    triton = pytest.importorskip("triton", reason="triton is not installed")
    from fastomni.kernels import gabor_filter as kernels

    for name, compiled in kernels.compile_all(triton.backends.compiler.GPUTarget("cuda", arch, 32)).items():
        ptx = compiled.asm["ptx"]
        assert f".target sm_{arch}" in ptx and compiled.asm["cubin"], name
        assert compiled.metadata.shared <= shared_limit, (name, compiled.metadata.shared)
        has_dot = "bare" not in name
        assert (("mma.sync" in ptx or "wgmma" in ptx) and ".tf32" in ptx) == has_dot, name
