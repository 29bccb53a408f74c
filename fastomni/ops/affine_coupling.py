"""One affine coupling layer of OmniMotion's bijection: ``fastomni::affine_coupling`` (forward)
and ``fastomni::affine_coupling_bwd`` (explicit backward), dispatched between the backends.

Math (spec: :mod:`fastomni.reference.affine_coupling`): from the two kept coordinates of each point
the layer's MLP gives ``(s, t)``, ``s`` clamped to [-8, 8]; the transformed coordinate ``c`` becomes
``(y_c - t) e^{-s}`` (forward, local -> canonical) or ``y_c e^{s} + t`` (inverse). The frame's
latent code enters as a per-frame bias ``code_bias [n, H0]`` of the first hidden layer, computed
once per frame by the caller.

The native backends save only their inputs and recompute the MLP's activations in the backward,
so a layer's autograd memory is that of ``y``, not of its ``n * P * (Pd + H0 + .. + HL)`` activations.
The ``triton`` backward holds, while it runs, each point's activations and pre-activation gradients
(8,272 B per point in float32 at widths 256, F = 4; twice that in float64) and forms the weight
gradients from them as one ``mm`` per weight: no atomics, the same bits on every run of a shape
(:mod:`fastomni.kernels.affine_coupling`). The ``cuda`` backward adds per-block partial sums with
float atomics (rounding varies from run to run).

Example::

    >>> import torch
    >>> from fastomni.ops.affine_coupling import affine_coupling
    >>> n, P, H = 2, 5, 16
    >>> ws = [torch.randn(H, H) / 4 for _ in range(2)]
    >>> x = affine_coupling(torch.rand(n, P, 3), torch.randn(n, H), torch.randn(H, 18), torch.zeros(H),
    ...                     torch.randn(H, H) / 4, ws, [torch.zeros(H)] * 2, torch.randn(2, H) / 4,
    ...                     torch.zeros(2), torch.pi * 2.0 ** torch.arange(4), transformed=1, inverse=False)
    >>> x.shape
    torch.Size([2, 5, 3])
"""
from __future__ import annotations

import torch
from torch import Tensor

from fastomni._nvtx import annotate
from fastomni.ops import _checks, _registry
from fastomni.reference import affine_coupling as ref

__all__ = ["affine_coupling", "affine_coupling_op", "affine_coupling_bwd_op", "cuda_shared_bytes"]

OP = "affine_coupling"
_CPU_MODULE, _CUDA_MODULE = "_C_affine_coupling", "_cuda_affine_coupling"



def _gpu_layer(tensors) -> str | None:
    """Why the GPU kernels cannot take this layer: they implement the default network only (two
    hidden layers, power-of-two widths in [16, 256], kept in registers). ``tensors`` as passed to
    the checks: y, code_bias, proj_w, proj_b, in_w, *hidden_w, *hidden_b, out_w, out_b, sigma."""
    if not tensors:
        return None
    n_hidden = (len(tensors) - 8) // 2
    if n_hidden != 2:
        return f"the GPU kernels take exactly 2 hidden layers, got {n_hidden}"
    widths = [tensors[i].shape[0] for i in (2, 4, 5, 6)]
    if any(w < 16 or w > 256 or w & (w - 1) for w in widths):
        return f"the GPU kernels take widths that are powers of two in [16, 256], got {widths}"
    return None


def cuda_shared_bytes(dtype: torch.dtype, n_freq: int, widths, backward: bool) -> int:
    """Dynamic shared memory one block of the CUDA forward / backward kernel asks for: the formula of
    ``shared_bytes`` in csrc/affine_coupling_cuda.cuh (a test checks that the two agree). ``widths``:
    PD, H0, H1, H2. At widths 256, F = 4: 68,224 B forward, 134,272 B backward."""
    size = dtype.itemsize
    bm = 128 // size  # kPointsPerBlock
    enc = 2 + 4 * n_freq
    ld = max(*widths, enc) + 1
    elems = bm * enc + 4 * bm * ld + 3 * bm if backward else bm * enc + 2 * bm * ld + 2 * bm
    return elems * size


@torch.compiler.assume_constant_result
def _shared_memory_limit(device_index: int | None) -> int:
    # constant for torch.compile (as _checks._load): evaluated once while tracing
    return torch.cuda.get_device_properties(device_index).shared_memory_per_block_optin


def _cuda_shared_memory(tensors) -> str | None:
    """Why the CUDA kernels cannot launch on the tensors' device: their backward needs more shared
    memory per block than the device lets a block opt in to (then the registry falls back)."""
    if not tensors:
        return None
    y, sigma = tensors[0], tensors[-1]
    widths = [tensors[i].shape[0] for i in (2, 4, 5, 6)]
    need = max(cuda_shared_bytes(y.dtype, sigma.shape[0], widths, backward) for backward in (False, True))
    limit = _shared_memory_limit(y.device.index)
    if need > limit:
        return (f"its backward needs {need} B of shared memory per block at widths {widths}, "
                f"{y.device} allows {limit} B")
    return None


_CHECKS = {
    "reference": lambda *t: None,
    "cpu": lambda *t: _checks.cpu_native(_CPU_MODULE, *t),
    "triton": lambda *t: _checks.triton(*t) or _gpu_layer(t),
    "cuda": lambda *t: _checks.cuda_native(_CUDA_MODULE, *t) or _gpu_layer(t) or _cuda_shared_memory(t),
}
for _name, _check in _CHECKS.items():
    _registry.register(OP, _name, _check)


def _tensors(args) -> list[Tensor]:
    """The tensors of ``(y, code_bias, .., sigma, ...)`` flat, in the order the checks take them."""
    y, code_bias, proj_w, proj_b, in_w, hidden_w, hidden_b, out_w, out_b, sigma = args[:10]
    return [y, code_bias, proj_w, proj_b, in_w, *hidden_w, *hidden_b, out_w, out_b, sigma]


def _fwd(backend, *args):
    if backend == "reference":
        return ref.affine_coupling(*args).contiguous()
    _checks.require(OP, _CHECKS, backend, *_tensors(args))
    if backend == "cpu":
        return torch.ops.fastomni_cpu.affine_coupling_fwd(*args)
    if backend == "cuda":
        return torch.ops.fastomni_cuda.affine_coupling_fwd(*args)
    from fastomni.kernels import affine_coupling as kernels

    return kernels.affine_coupling_fwd(*args)


def _bwd(backend, grad_out, *args):
    if backend == "reference":
        g = ref.affine_coupling_bwd_ref(grad_out, *args)
        return [*g[:5], *g[5], *g[6], *g[7:]]
    _checks.require(OP, _CHECKS, backend, *_tensors(args))
    if backend == "cpu":
        return torch.ops.fastomni_cpu.affine_coupling_bwd(grad_out, *args)
    if backend == "cuda":
        return torch.ops.fastomni_cuda.affine_coupling_bwd(grad_out, *args)
    from fastomni.kernels import affine_coupling as kernels

    return kernels.affine_coupling_bwd(grad_out, *args)


@torch.library.custom_op("fastomni::affine_coupling", mutates_args=())
def affine_coupling_op(y: Tensor, code_bias: Tensor, proj_weight: Tensor, proj_bias: Tensor, in_weight: Tensor,
                       hidden_weights: list[Tensor], hidden_biases: list[Tensor], out_weight: Tensor,
                       out_bias: Tensor, sigma: Tensor, transformed: int, inverse: bool, negative_slope: float,
                       backend: str) -> Tensor:
    """Points ``y [n, P, 3]`` -> ``[n, P, 3]`` (arguments as :func:`affine_coupling`)."""
    with annotate(f"{OP}.fwd"):
        return _fwd(backend, y, code_bias, proj_weight, proj_bias, in_weight, hidden_weights, hidden_biases,
                    out_weight, out_bias, sigma, transformed, inverse, negative_slope)


@affine_coupling_op.register_fake
def _(y, code_bias, proj_weight, proj_bias, in_weight, hidden_weights, hidden_biases, out_weight, out_bias, sigma,
      transformed, inverse, negative_slope, backend):
    return torch.empty_like(y)


@torch.library.custom_op("fastomni::affine_coupling_bwd", mutates_args=())
def affine_coupling_bwd_op(grad_out: Tensor, y: Tensor, code_bias: Tensor, proj_weight: Tensor, proj_bias: Tensor,
                           in_weight: Tensor, hidden_weights: list[Tensor], hidden_biases: list[Tensor],
                           out_weight: Tensor, out_bias: Tensor, sigma: Tensor, transformed: int, inverse: bool,
                           negative_slope: float, backend: str) -> list[Tensor]:
    """Gradients, flat: ``[y, code_bias, proj_weight, proj_bias, in_weight, *hidden_weights,
    *hidden_biases, out_weight, out_bias]`` (``sigma`` gets none: fixed frequencies)."""
    with annotate(f"{OP}.bwd"):
        return _bwd(backend, grad_out, y, code_bias, proj_weight, proj_bias, in_weight, hidden_weights,
                    hidden_biases, out_weight, out_bias, sigma, transformed, inverse, negative_slope)


@affine_coupling_bwd_op.register_fake
def _(grad_out, y, code_bias, proj_weight, proj_bias, in_weight, hidden_weights, hidden_biases, out_weight, out_bias,
      sigma, transformed, inverse, negative_slope, backend):
    inputs = [y, code_bias, proj_weight, proj_bias, in_weight, *hidden_weights, *hidden_biases, out_weight, out_bias]
    return [torch.empty_like(t) for t in inputs]


def _setup_context(ctx, inputs, output):
    y, code_bias, proj_w, proj_b, in_w, hidden_w, hidden_b, out_w, out_b, sigma = inputs[:10]
    ctx.n_hidden = len(hidden_w)
    ctx.attrs = inputs[10:]  # transformed, inverse, negative_slope, backend
    ctx.save_for_backward(y, code_bias, proj_w, proj_b, in_w, *hidden_w, *hidden_b, out_w, out_b, sigma)


def _backward(ctx, grad_out):
    saved, L = ctx.saved_tensors, ctx.n_hidden
    hidden_w, hidden_b = list(saved[5:5 + L]), list(saved[5 + L:5 + 2 * L])
    g = affine_coupling_bwd_op(grad_out.contiguous(), *saved[:5], hidden_w, hidden_b, *saved[5 + 2 * L:], *ctx.attrs)
    return (*g[:5], list(g[5:5 + L]), list(g[5 + L:5 + 2 * L]), g[-2], g[-1], None, None, None, None, None)


affine_coupling_op.register_autograd(_backward, setup_context=_setup_context)


def affine_coupling(y: Tensor, code_bias: Tensor, proj_weight: Tensor, proj_bias: Tensor, in_weight: Tensor,
                    hidden_weights: list[Tensor], hidden_biases: list[Tensor], out_weight: Tensor, out_bias: Tensor,
                    sigma: Tensor, transformed: int, inverse: bool, negative_slope: float = 0.01) -> Tensor:
    """One coupling layer on points ``y [n, ..., 3]`` of ``n`` frames; returns ``[n, ..., 3]``.

    All tensors share y's dtype (float32 or float64) and device. ``code_bias [n, H0]``: the code's
    share of the first hidden layer plus its bias; ``proj_weight [Pd, 2 + 4F]``, ``proj_bias [Pd]``:
    the positional encoding's linear; ``in_weight [H0, Pd]``: the projection's share of the first
    hidden layer; ``hidden_weights[l] [H_{l+1}, H_l]`` and ``hidden_biases[l]``; ``out_weight
    [2, H_L]``, ``out_bias [2]`` give ``(s, t)``; ``sigma [F]``: encoding frequencies (no gradient).
    ``transformed`` in (0, 1, 2); LeakyReLU slope ``negative_slope >= 0``. Differentiable w.r.t. y,
    code_bias and every weight and bias.
    """
    if y.dim() < 2 or y.shape[-1] != 3:
        raise ValueError(f"y must be [n, ..., 3], got {tuple(y.shape)}")
    if code_bias.dim() != 2 or code_bias.shape[0] != y.shape[0] or code_bias.shape[1] != in_weight.shape[0]:
        raise ValueError(f"code_bias must be [n={y.shape[0]}, H0={in_weight.shape[0]}], got {tuple(code_bias.shape)}")
    if len(hidden_weights) != len(hidden_biases):
        raise ValueError(f"{len(hidden_weights)} hidden weights but {len(hidden_biases)} hidden biases")
    if transformed not in (0, 1, 2):
        raise ValueError(f"transformed must be 0, 1 or 2, got {transformed}")
    if negative_slope < 0:
        raise ValueError(f"negative_slope must be >= 0 (the backward reads the LeakyReLU derivative from its "
                         f"output), got {negative_slope}")
    flat = y.reshape(y.shape[0], -1, 3)
    args = (code_bias, proj_weight, proj_bias, in_weight, list(hidden_weights), list(hidden_biases), out_weight,
            out_bias, sigma, int(transformed), bool(inverse), float(negative_slope))
    backend = _registry.select(OP, flat, code_bias, proj_weight, proj_bias, in_weight, *hidden_weights,
                               *hidden_biases, out_weight, out_bias, sigma)
    if backend == "reference":
        return ref.affine_coupling(flat, *args).reshape(y.shape)
    return affine_coupling_op(flat, *args, backend).reshape(y.shape)
