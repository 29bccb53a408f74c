"""Gabor filters and whole multiplicative filter networks: ``fastomni::gabor_step`` (one MFN step)
and ``fastomni::gabor_net`` (a whole GaborNet in one call), each with an explicit backward op
(``fastomni::gabor_step_bwd``, ``fastomni::gabor_net_bwd``), dispatched between the backends.

Math (spec: :mod:`fastomni.reference.gabor_filter`), for points ``x [N, in]``::

    g_k(x) = sin(x W_k^T + b_k) * exp(-0.5 * gamma_k * (|x|^2 + |mu_k|^2 - 2 x mu_k^T))
    h_0 = g_0(x),  h_k = g_k(x) * (h_{k-1} L_k^T + c_k),  y = h_L W_o^T + b_o

``gabor_net`` never materialises the reference's per-layer temporaries: the native backends run
the layers on chunks of rows and, for training, save only ``lin_k = h_{k-1} L_k^T + c_k``
(``[L, N, H]``); the backward rebuilds every filter value from ``x``. With ``recompute=True``
nothing of size ``[N, H]`` is kept and the backward recomputes the ``lin_k`` (``L`` more GEMMs).

Example::

    >>> import torch
    >>> from fastomni.ops.gabor_filter import gabor_net
    >>> H, L = 16, 2
    >>> fw, mu = [torch.randn(H, 3) for _ in range(L + 1)], [torch.rand(H, 3) for _ in range(L + 1)]
    >>> fb, gamma = [torch.rand(H) for _ in range(L + 1)], [torch.rand(H) for _ in range(L + 1)]
    >>> lw, lb = [torch.randn(H, H) / 4 for _ in range(L)], [torch.zeros(H) for _ in range(L)]
    >>> gabor_net(torch.rand(10, 3), fw, fb, mu, gamma, lw, lb, torch.randn(4, H), torch.zeros(4)).shape
    torch.Size([10, 4])
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from fastomni._nvtx import annotate
from fastomni.ops import _checks, _registry
from fastomni.reference import gabor_filter as ref

__all__ = ["gabor_step", "gabor_net", "gabor_step_op", "gabor_net_op"]

OP = "gabor_filter"
_CHECKS = _checks.register_backends(OP)


def _native(backend: str):
    """The namespace holding ``backend``'s kernels (``gabor_step_fwd`` ... ``gabor_net_bwd``)."""
    _checks.require(OP, _CHECKS, backend)
    if backend == "cpu":
        return torch.ops.fastomni_cpu
    if backend == "cuda":
        return torch.ops.fastomni_cuda
    from fastomni.kernels import gabor_filter as kernels

    return kernels


def _empty_for_none(ref_like: Tensor, grads) -> tuple[Tensor, ...]:
    # custom ops cannot return None: a gradient of an absent input is an empty tensor
    return tuple(ref_like.new_empty(0) if g is None else g.contiguous() for g in grads)


# ------------------------------------------------------------------------------------------------
# fastomni::gabor_step


@torch.library.custom_op("fastomni::gabor_step", mutates_args=())
def gabor_step_op(x: Tensor, weight: Tensor, bias: Tensor, mu: Tensor, gamma: Tensor, prev: Optional[Tensor],
                  lin_weight: Optional[Tensor], lin_bias: Optional[Tensor], backend: str) -> Tensor:
    """Flat, contiguous form of :func:`gabor_step`: x ``[N, in]``; returns ``[N, H]``."""
    with annotate(f"{OP}.step_fwd"):
        if backend == "reference":
            return ref.gabor_step(x, weight, bias, mu, gamma, prev, lin_weight, lin_bias).contiguous()
        return _native(backend).gabor_step_fwd(x, weight, bias, mu, gamma, prev, lin_weight, lin_bias)


@gabor_step_op.register_fake
def _(x, weight, bias, mu, gamma, prev, lin_weight, lin_bias, backend):
    return x.new_empty(x.shape[0], weight.shape[0])


@torch.library.custom_op("fastomni::gabor_step_bwd", mutates_args=())
def gabor_step_bwd_op(grad_out: Tensor, x: Tensor, weight: Tensor, bias: Tensor, mu: Tensor, gamma: Tensor,
                      prev: Optional[Tensor], lin_weight: Optional[Tensor], lin_bias: Optional[Tensor],
                      backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Backward of :func:`gabor_step_op`: gradients of (x, weight, bias, mu, gamma, prev,
    lin_weight, lin_bias); those of absent inputs are empty ``[0]`` tensors."""
    with annotate(f"{OP}.step_bwd"):
        if backend == "reference":
            return _empty_for_none(x, ref.gabor_step_bwd_ref(grad_out, x, weight, bias, mu, gamma, prev, lin_weight,
                                                             lin_bias))
        return _native(backend).gabor_step_bwd(grad_out, x, weight, bias, mu, gamma, prev, lin_weight, lin_bias)


@gabor_step_bwd_op.register_fake
def _(grad_out, x, weight, bias, mu, gamma, prev, lin_weight, lin_bias, backend):
    like = [x, weight, bias, mu, gamma, prev, lin_weight, lin_bias]
    return tuple(x.new_empty(0) if t is None else torch.empty_like(t) for t in like)


def _step_setup(ctx, inputs, output):
    *tensors, backend = inputs
    ctx.save_for_backward(*tensors)
    ctx.backend = backend


def _step_backward(ctx, grad_out):
    x, weight, bias, mu, gamma, prev, lin_weight, lin_bias = ctx.saved_tensors
    grads = gabor_step_bwd_op(grad_out.contiguous(), x, weight, bias, mu, gamma, prev, lin_weight, lin_bias,
                              ctx.backend)
    present = (x, weight, bias, mu, gamma, prev, lin_weight, lin_bias)
    return (*(g if t is not None else None for g, t in zip(grads, present)), None)


gabor_step_op.register_autograd(_step_backward, setup_context=_step_setup)


# ------------------------------------------------------------------------------------------------
# fastomni::gabor_net

def _n_saved(lin_weight: Sequence[Tensor], save_lin: bool, backend: str) -> int:
    # the reference backend saves nothing: its explicit backward recomputes every hidden state
    return len(lin_weight) if save_lin and backend != "reference" else 0


@torch.library.custom_op("fastomni::gabor_net", mutates_args=())
def gabor_net_op(x: Tensor, filter_weight: list[Tensor], filter_bias: list[Tensor], mu: list[Tensor],
                 gamma: list[Tensor], lin_weight: list[Tensor], lin_bias: list[Tensor], out_weight: Tensor,
                 out_bias: Tensor, save_lin: bool, backend: str) -> tuple[Tensor, Tensor]:
    """Flat, contiguous form of :func:`gabor_net`: x ``[N, in]``. Returns ``y [N, O]`` and the
    saved ``lins [L, N, H]`` for the backward (``[0, N, H]`` unless ``save_lin``; always for the
    reference backend)."""
    with annotate(f"{OP}.net_fwd"):
        if backend == "reference":
            y = ref.gabor_net(x, filter_weight, filter_bias, mu, gamma, lin_weight, lin_bias, out_weight, out_bias)
            return y.contiguous(), x.new_empty(0, x.shape[0], filter_weight[0].shape[0])
        return _native(backend).gabor_net_fwd(x, filter_weight, filter_bias, mu, gamma, lin_weight, lin_bias,
                                              out_weight, out_bias, save_lin)


@gabor_net_op.register_fake
def _(x, filter_weight, filter_bias, mu, gamma, lin_weight, lin_bias, out_weight, out_bias, save_lin, backend):
    N, H = x.shape[0], filter_weight[0].shape[0]
    return x.new_empty(N, out_weight.shape[0]), x.new_empty(_n_saved(lin_weight, save_lin, backend), N, H)


@torch.library.custom_op("fastomni::gabor_net_bwd", mutates_args=())
def gabor_net_bwd_op(grad_out: Tensor, x: Tensor, filter_weight: list[Tensor], filter_bias: list[Tensor],
                     mu: list[Tensor], gamma: list[Tensor], lin_weight: list[Tensor], lin_bias: list[Tensor],
                     out_weight: Tensor, out_bias: Tensor, lins: Tensor, backend: str
                     ) -> tuple[Tensor, list[Tensor], list[Tensor], list[Tensor], list[Tensor], list[Tensor],
                                list[Tensor], Tensor, Tensor]:
    """Backward of :func:`gabor_net_op` from ``grad_out [N, O]`` and the saved ``lins`` (empty:
    recompute). Returns the gradients of x, the six parameter lists and the output linear."""
    with annotate(f"{OP}.net_bwd"):
        params = (filter_weight, filter_bias, mu, gamma, lin_weight, lin_bias, out_weight, out_bias)
        if backend == "reference":
            dx, *lists, dow, dob = ref.gabor_net_bwd_ref(grad_out, x, *params)
            return (dx.contiguous(), *([g.contiguous() for g in grads] for grads in lists), dow.contiguous(),
                    dob.contiguous())
        return _native(backend).gabor_net_bwd(grad_out, x, *params, lins)


@gabor_net_bwd_op.register_fake
def _(grad_out, x, filter_weight, filter_bias, mu, gamma, lin_weight, lin_bias, out_weight, out_bias, lins,
      backend):
    lists = (filter_weight, filter_bias, mu, gamma, lin_weight, lin_bias)
    return (torch.empty_like(x), *([torch.empty_like(t) for t in ts] for ts in lists), torch.empty_like(out_weight),
            torch.empty_like(out_bias))


def _net_setup(ctx, inputs, output):
    x, fw, fb, mu, gamma, lw, lb, ow, ob, save_lin, backend = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # else autograd allocates a zero gradient as large as lins
    ctx.save_for_backward(x, *fw, *fb, *mu, *gamma, *lw, *lb, ow, ob, output[1])
    ctx.sizes = (len(fw), len(lw), len(lb))
    ctx.backend = backend


def _net_backward(ctx, grad_out, _grad_lins):
    n_f, n_l, n_b = ctx.sizes
    if grad_out is None:  # an undefined output gradient (not materialised): no input gradients
        return (None, *([None] * n for n in (n_f, n_f, n_f, n_f, n_l, n_b)), None, None, None, None)
    x, *rest = ctx.saved_tensors
    lists, at = [], 0
    for n in (n_f, n_f, n_f, n_f, n_l, n_b):
        lists.append(rest[at:at + n])
        at += n
    ow, ob, lins = rest[at:]
    grads = gabor_net_bwd_op(grad_out.contiguous(), x, *lists, ow, ob, lins, ctx.backend)
    return (*grads, None, None)


gabor_net_op.register_autograd(_net_backward, setup_context=_net_setup)


# ------------------------------------------------------------------------------------------------
# Public functions


def _check_param(t: Tensor, shape: tuple[int, ...], x: Tensor, name: str) -> None:
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")
    if t.dtype != x.dtype or t.device != x.device:
        raise TypeError(f"{name} is {t.dtype} on {t.device} but x is {x.dtype} on {x.device}")


def _check_filter(x: Tensor, weight: Tensor, bias: Tensor, mu: Tensor, gamma: Tensor, k: int = 0) -> int:
    if not x.is_floating_point() or x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"x must be a floating tensor [..., in >= 1], got {x.dtype} {list(x.shape)}")
    if weight.dim() != 2 or weight.shape[0] < 1:
        raise ValueError(f"filter {k} weight must be [H >= 1, in], got {list(weight.shape)}")
    H, n_in = weight.shape[0], x.shape[-1]
    _check_param(weight, (H, n_in), x, f"filter {k} weight")
    _check_param(bias, (H,), x, f"filter {k} bias")
    _check_param(mu, (H, n_in), x, f"filter {k} mu")
    _check_param(gamma, (H,), x, f"filter {k} gamma")
    return H


def gabor_step(x: Tensor, weight: Tensor, bias: Tensor, mu: Tensor, gamma: Tensor, prev: Tensor | None = None,
               lin_weight: Tensor | None = None, lin_bias: Tensor | None = None) -> Tensor:
    """One MFN step, ``g(x) * (prev @ lin_weight^T + lin_bias)``, or the bare Gabor filter ``g(x)``
    when ``prev`` is None.

    x: ``[..., in]`` float32/float64; weight, mu: ``[H, in]``; bias, gamma: ``[H]``; prev:
    ``[..., H_prev]`` (same leading dims as x) with lin_weight ``[H, H_prev]`` and lin_bias ``[H]``
    or None. Returns ``[..., H]``; differentiable in every tensor.
    """
    H = _check_filter(x, weight, bias, mu, gamma)
    lead, n_in = x.shape[:-1], x.shape[-1]
    if (prev is None) != (lin_weight is None) or (prev is None and lin_bias is not None):
        raise ValueError("prev and lin_weight go together; lin_bias needs them")
    if prev is not None:
        if prev.shape[:-1] != lead:
            raise ValueError(f"prev must be [{', '.join(map(str, lead))}, H_prev], got {list(prev.shape)}")
        _check_param(lin_weight, (H, prev.shape[-1]), x, "lin_weight")
        _check_param(prev, tuple(prev.shape), x, "prev")
        if lin_bias is not None:
            _check_param(lin_bias, (H,), x, "lin_bias")
    tensors = [t for t in (x, weight, bias, mu, gamma, prev, lin_weight, lin_bias) if t is not None]
    backend = _registry.select(OP, *tensors)
    flat = x.reshape(-1, n_in)
    flat_prev = None if prev is None else prev.reshape(-1, prev.shape[-1])
    if backend == "reference":
        out = ref.gabor_step(flat, weight, bias, mu, gamma, flat_prev, lin_weight, lin_bias)
    else:
        def c(t):
            return None if t is None else t.contiguous()

        out = gabor_step_op(flat.contiguous(), c(weight), c(bias), c(mu), c(gamma), c(flat_prev), c(lin_weight),
                            c(lin_bias), backend)
    return out.reshape(*lead, H)


def gabor_net(x: Tensor, filter_weight: Sequence[Tensor], filter_bias: Sequence[Tensor], mu: Sequence[Tensor],
              gamma: Sequence[Tensor], lin_weight: Sequence[Tensor], lin_bias: Sequence[Tensor], out_weight: Tensor,
              out_bias: Tensor, *, recompute: bool = False) -> Tensor:
    """A whole GaborNet (no output activation): ``L + 1`` filters, ``L`` hidden linears, the
    output linear.

    x: ``[..., in]`` float32/float64; per filter ``k = 0..L``: ``filter_weight[k], mu[k] [H, in]``,
    ``filter_bias[k], gamma[k] [H]``; ``lin_weight[k-1] [H, H]`` and ``lin_bias[k-1] [H]`` for
    ``k = 1..L`` (``lin_bias`` empty: bias-free linears); out_weight ``[O, H]``, out_bias ``[O]``.
    Returns ``[..., O]``; differentiable in every tensor. ``recompute``: keep nothing of size
    ``[N, H]`` for the backward (native backends; costs ``L`` more GEMMs in the backward).
    """
    L = len(filter_weight) - 1
    if L < 0 or not (len(filter_bias) == len(mu) == len(gamma) == L + 1) or len(lin_weight) != L:
        raise ValueError(f"need L + 1 >= 1 filters and L hidden linears, got {len(filter_weight)} weights, "
                         f"{len(filter_bias)} biases, {len(mu)} mu, {len(gamma)} gamma, {len(lin_weight)} linears")
    if len(lin_bias) not in (0, L):
        raise ValueError(f"lin_bias must be empty or have {L} entries, got {len(lin_bias)}")
    H = _check_filter(x, filter_weight[0], filter_bias[0], mu[0], gamma[0])
    for k in range(1, L + 1):
        _check_filter(x, filter_weight[k], filter_bias[k], mu[k], gamma[k], k)
        _check_param(filter_weight[k], (H, x.shape[-1]), x, f"filter {k} weight")
        _check_param(lin_weight[k - 1], (H, H), x, f"lin_weight {k - 1}")
        if lin_bias:
            _check_param(lin_bias[k - 1], (H,), x, f"lin_bias {k - 1}")
    if out_weight.dim() != 2:
        raise ValueError(f"out_weight must be [O, {H}], got {list(out_weight.shape)}")
    _check_param(out_weight, (out_weight.shape[0], H), x, "out_weight")
    _check_param(out_bias, (out_weight.shape[0],), x, "out_bias")
    params = [list(filter_weight), list(filter_bias), list(mu), list(gamma), list(lin_weight), list(lin_bias)]
    tensors = [x, *(t for ts in params for t in ts), out_weight, out_bias]
    backend = _registry.select(OP, *tensors)
    lead, flat = x.shape[:-1], x.reshape(-1, x.shape[-1])
    if backend == "reference":
        out = ref.gabor_net(flat, *params, out_weight, out_bias)
    else:
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
        out, _ = gabor_net_op(flat.contiguous(), *([t.contiguous() for t in ts] for ts in params),
                              out_weight.contiguous(), out_bias.contiguous(), needs_grad and not recompute, backend)
    return out.reshape(*lead, out.shape[-1])
