"""composite: every backend against the reference (forward and backward), the explicit reference
backward against autograd, gradcheck, opcheck, torch.compile, dispatch errors, batched == flat."""
from __future__ import annotations

import os

import pytest
import torch
from conftest import NATIVE_BACKENDS, TOLERANCES, backend_device

from fastomni.ops import BackendUnavailable, use_backend
from fastomni.ops.composite import composite, composite_op
from fastomni.reference import composite as ref

OP = "composite"
# (leading ray dims, samples K, color channels C, point channels D): no rays, one sample, primes,
# OmniMotion's 32 samples with no colors (correspondence only)
SHAPES = [((0,), 5, 3, 3), ((1,), 1, 3, 3), ((3, 7), 13, 3, 2), ((2, 5), 32, 0, 3)]
MODES = [(False, False), (False, True), (True, False), (True, True)]  # (select_max, with mask)


def _inputs(lead, K, C, D, dtype, device, masked, seed=0):
    g = torch.Generator().manual_seed(seed)
    # densities from 0 to 8 with exact zeros and saturating samples (alpha == 1 in float32)
    density = torch.rand(*lead, K, generator=g, dtype=torch.float64) * 8
    density[torch.rand(*lead, K, generator=g) < 0.15] = 0.0
    density[torch.rand(*lead, K, generator=g) < 0.05] = 30.0
    colors = torch.rand(*lead, K, C, generator=g, dtype=torch.float64)
    points = torch.randn(*lead, K, D, generator=g, dtype=torch.float64)
    mask = torch.rand(*lead, K, generator=g) < 0.7 if masked else None
    cast = [t.to(dtype=dtype, device=device) for t in (density, colors, points)]
    return (*cast, None if mask is None else mask.to(device))


def _grads(outs, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o) for o in outs]


@pytest.mark.parametrize("backend", NATIVE_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("select_max,masked", MODES)
def test_matches_reference(backend, dtype, shape, select_max, masked):
    device = backend_device(OP, backend)
    density, colors, points, mask = _inputs(*shape, dtype, device, masked)
    leaves = [t.requires_grad_() for t in (density, colors, points)]
    want = ref.composite(density, colors, points, mask, select_max)
    with use_backend(backend):
        got = composite(density, colors, points, mask, select_max=select_max)
    for name, a, b in zip(got._fields, got, want):
        assert a.shape == b.shape, name
        torch.testing.assert_close(a, b, **TOLERANCES[dtype], msg=name)
    grads = _grads(want)
    want_g = torch.autograd.grad(want, leaves, grads, allow_unused=True)
    got_g = torch.autograd.grad(got, leaves, grads, allow_unused=True)
    for name, a, b in zip(("density", "colors", "points"), got_g, want_g):
        torch.testing.assert_close(a, b, **TOLERANCES[dtype], msg=f"grad {name}")


@pytest.mark.parametrize("select_max,masked", MODES)
def test_reference_backward_is_autograd(select_max, masked):
    """The explicit reference backward equals autograd through the reference forward."""
    density, colors, points, mask = _inputs((4, 3), 11, 3, 3, torch.float64, "cpu", masked)
    leaves = [t.requires_grad_() for t in (density, colors, points)]
    outs = ref.composite(density, colors, points, mask, select_max)
    grads = _grads(outs)
    auto = torch.autograd.grad(outs, leaves, grads)
    explicit = ref.composite_bwd_ref(*grads, density, colors, points, mask, select_max)
    for a, b in zip(explicit, auto):
        torch.testing.assert_close(a, b, **TOLERANCES[torch.float64])


@pytest.mark.parametrize("backend", ["reference", *NATIVE_BACKENDS])
@pytest.mark.parametrize("select_max,masked", MODES)
def test_gradcheck(backend, select_max, masked):
    """float64 gradcheck of the custom op (for ``reference``: the explicit reference backward)."""
    device = "cpu" if backend == "reference" else backend_device(OP, backend)
    density, colors, points, mask = _inputs((5,), 6, 2, 3, torch.float64, device, masked)
    density = (density.clamp_max(4.0) + 0.1).requires_grad_()  # away from the kink at 0 and saturation
    colors.requires_grad_()
    points.requires_grad_()
    # fast mode (random projections of the Jacobian) for triton: each call is slow in the interpreter
    assert torch.autograd.gradcheck(lambda d, c, p: composite_op(d, c, p, mask, select_max, backend),
                                     (density, colors, points), fast_mode=backend == "triton")


@pytest.mark.parametrize("backend", ["reference", *NATIVE_BACKENDS])
@pytest.mark.parametrize("select_max,masked", [(False, True), (True, False)])
def test_opcheck(backend, select_max, masked):
    device = "cpu" if backend == "reference" else backend_device(OP, backend)
    density, colors, points, mask = _inputs((6,), 7, 3, 3, torch.float32, device, masked)
    for t in (density, colors, points):
        t.requires_grad_()
    torch.library.opcheck(composite_op, (density, colors, points, mask, select_max, backend))


@pytest.mark.parametrize("backend", NATIVE_BACKENDS)
def test_compile_fullgraph(backend):
    device = backend_device(OP, backend)
    density, colors, points, mask = _inputs((2, 3), 8, 3, 3, torch.float32, device, True)
    density.requires_grad_()

    def loss(density):
        out = composite(density, colors, points, mask)
        return out.rgb.sum() + out.point.square().sum() + out.weights.square().sum()

    with use_backend(backend):
        compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
        got = torch.autograd.grad(compiled(density), density)[0]
        want = torch.autograd.grad(loss(density), density)[0]
    torch.testing.assert_close(got, want, **TOLERANCES[torch.float32])


def test_batched_equals_flat_and_split():
    """Rays are independent: one batched call, the flattened call and calls on halves agree exactly."""
    backend_device(OP, "cpu")
    density, colors, points, mask = _inputs((4, 6), 32, 3, 3, torch.float32, "cpu", True)
    with use_backend("cpu"):
        batched = composite(density, colors, points, mask)
        flat = composite(density.reshape(24, 32), colors.reshape(24, 32, 3), points.reshape(24, 32, 3),
                         mask.reshape(24, 32))
        halves = [composite(density[i:i + 2], colors[i:i + 2], points[i:i + 2], mask[i:i + 2]) for i in (0, 2)]
    for i, name in enumerate(batched._fields):
        torch.testing.assert_close(flat[i].reshape(batched[i].shape), batched[i], atol=0, rtol=0, msg=name)
        torch.testing.assert_close(torch.cat([h[i] for h in halves]), batched[i], atol=0, rtol=0, msg=name)


@pytest.mark.parametrize("backend", NATIVE_BACKENDS)
def test_edge_semantics(backend):
    """First maximum wins ties; a ray with every sample masked has zero point and opacity."""
    device = backend_device(OP, backend)
    big = 40.0  # alpha 1: all the weight on the first such sample, none behind it
    density = torch.tensor([[0.0, big, big, 0.0], [1.0, 2.0, 3.0, 4.0]], device=device)
    points = torch.arange(24, dtype=torch.float32, device=device).reshape(2, 4, 3)
    mask = torch.tensor([[True, True, True, True], [False, False, False, False]], device=device)
    with use_backend(backend):
        out = composite(density, points=points, mask=mask, select_max=True)
        summed = composite(density, points=points, mask=mask)
    torch.testing.assert_close(out.point[0], points[0, 1])
    torch.testing.assert_close(out.opacity[:, 0], torch.tensor([1.0, 0.0], device=device))
    torch.testing.assert_close(summed.point[1], torch.zeros(3, device=device))
    assert summed.rgb.shape == (2, 0)


def test_occlusion_score_is_masked_opacity():
    density, _, _, _ = _inputs((3, 5), 9, 0, 0, torch.float64, "cpu", False)
    depths = torch.linspace(0, 2, 9, dtype=torch.float64).expand(3, 5, 9)
    depth = torch.rand(3, 5, 1, dtype=torch.float64) * 2
    weights, _ = ref.composite_alpha(density)
    want = ref.occlusion_score(weights, depths, depth, eps=0.1)
    backend_device(OP, "cpu")
    with use_backend("cpu"):
        got = composite(density, mask=depths < depth - 0.1).opacity
    torch.testing.assert_close(got, want, **TOLERANCES[torch.float64])


def test_dispatch_errors():
    density = torch.rand(3, 4)
    with use_backend("cpu"), pytest.raises(BackendUnavailable, match="float32 or float64"):
        composite(density.half())
    with use_backend("cuda"), pytest.raises(BackendUnavailable, match="CUDA|cuda tensors|not built"):
        composite(density)
    if os.environ.get("TRITON_INTERPRET") != "1":  # without the interpreter triton takes CUDA tensors only
        with use_backend("triton"), pytest.raises(BackendUnavailable, match="cuda tensors|triton is not installed"):
            composite(density)
    with pytest.raises(BackendUnavailable, match="'nope'"):
        composite_op(density, density[..., None], density[..., None], None, False, "nope")
    with pytest.raises(TypeError, match="dtype"):
        composite(density, colors=torch.rand(3, 4, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="mask"):
        composite(density, mask=torch.ones(3, 4))
    with pytest.raises(ValueError, match="K >= 1"):
        composite(torch.rand(3, 0))


def test_model_blend_matches_original_formulas(tiny_model):
    """OmniMotion.blend in one call: near samples masked by zero density (alpha exactly 0), rgb from
    the unmasked weights, the mapped points from the weights masked to the depth range."""
    m = tiny_model
    px = torch.rand(2, 3, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 10
    with torch.no_grad():
        x2, u = m.map_between(m.sample_rays(px)[0], [0, 1], [2, 3])
        in_depth = (x2[..., 2] >= m.min_depth) & (x2[..., 2] <= m.max_depth)
        colors, density = m.color_density(u)
        keep = torch.ones_like(density)
        keep[..., : int(m.num_samples_ray * 0.2)] = 0
        alphas = ref.composite_alpha(density)[1] * keep
        weights = ref.alpha_to_weights(alphas)
        backend_device(OP, "cpu")
        with use_backend("cpu"):
            blend = m.blend(u, mask_near=True, points=x2, points_mask=in_depth)
    assert not bool(in_depth.all()) and bool(in_depth.any())  # the mask matters for this input
    tol = TOLERANCES[torch.float64]
    torch.testing.assert_close(blend.alphas, alphas, **tol)
    torch.testing.assert_close(blend.weights, weights, **tol)
    torch.testing.assert_close(blend.rendered_rgbs, ref.composite_values(weights, colors), **tol)
    torch.testing.assert_close(blend.point, ref.composite_values(weights * in_depth, x2), **tol)


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="TRITON_INTERPRET=1 replaces the compiler")
@pytest.mark.parametrize("kernel", ["_composite_fwd_kernel", "_composite_bwd_kernel"])
@pytest.mark.parametrize("dtype,select_max", [("fp32", False), ("fp64", True)])
def test_triton_compiles_for_sm80_and_sm90(arch, kernel, dtype, select_max):
    """A real compile to PTX and cubin for sm_80 and sm_90 (no GPU needed), within the shared memory a
    block may opt in to (A100: 166,912 B, H100: 232,448 B)."""
    triton = pytest.importorskip("triton", reason="triton is not installed")
    from fastomni.kernels import composite as kernels
    from triton.backends.compiler import GPUTarget

    fn = getattr(kernels, kernel)
    constexprs = {"C": 3, "D": 3, "HAS_MASK": True, "SELECT_MAX": select_max, "BLOCK_R": 16, "BLOCK_K": 32}
    signature = {name: "constexpr" if name in constexprs else "i32" if name in ("R", "K")
                 else "*i1" if name == "mask" else f"*{dtype}" for name in fn.arg_names}
    compiled = triton.compile(triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                              target=GPUTarget("cuda", arch, 32))
    assert f".target sm_{arch}" in compiled.asm["ptx"] and compiled.asm["cubin"]
    assert compiled.metadata.shared <= {80: 166_912, 90: 232_448}[arch], compiled.metadata.shared
