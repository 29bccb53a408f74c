"""Triton kernels of ``gabor_filter`` (spec: :mod:`fastomni.reference.gabor_filter`): the Gabor
filter fused into the epilogue of the matmul that feeds it.

Forward, ``_gabor_fwd_kernel``, layer ``k`` of a GaborNet (or one ``gabor_step``)::

    lin = A @ Lw^T + c            (A = h_{k-1} [N, K], Lw [H, K]; tl.dot over K in BK slices)
    out = sin(x W^T + b) * exp(-0.5 * gamma * (|x|^2 + |mu|^2 - 2 x mu^T)) * lin

Backward, ``_gabor_bwd_kernel``, the filter's backward fused into the matmul that produces either
``gh = dLoss/dh_k`` (GaborNet: ``gh_k = dlin_{k+1} @ L_{k+1}``, ``gh_L = grad_out @ W_o``) or
``lin`` (``gabor_step``: ``prev @ Lw^T + c`` recomputed); the other operand is loaded. Epilogue::

    dlin = gh * g,  h = g * lin,  dg = gh * lin,  dz = dg cos(z) e,  t = dg g,  dD = -0.5 gamma t
    column sums over the tile's rows: dz, -0.5 D t, dD, dlin, dz x_i, dD x_i
    row sums over the tile's columns: dx_i = dz W_i + 2 (dD x_i - dD mu_i)

The column sums go to a ``[row blocks, 4 + 2 IN, H]`` and the row sums to a ``[column blocks, N,
IN]`` buffer of partials, summed by torch afterwards (deterministic, no atomics). The weight
gradients of the hidden and output linears (``dlin_{k+1}^T h_k``, ``grad_out^T h_L``) and the
output linear's forward (``[N, 512] x [512, 4]``, memory-bound) are plain GEMMs left to torch.

Tiling: a program owns a ``BM x BN`` tile of the ``[N, H]`` output (64 x 64, 4 warps). Its
accumulator (``BM x BN`` float32, 32 registers a thread) and the epilogue stay in registers; the
``BM x BK`` and ``BK x BN`` operand slices are staged through shared memory by ``tl.dot`` (16 KiB
a stage at BK = 32, float32). The filter parameters of the tile's columns (``W``, ``mu``: ``IN x BN``;
``b``, ``gamma``: ``BN``) and the tile's points (``BM x IN``) are loaded once, as vectors. ``IN``
(1 or 3 in OmniMotion) is a compile-time constant: ``x W^T`` and ``x mu^T`` are ``IN`` broadcast
multiply-adds, no dot. float32 dots use ``input_precision="tf32x3"`` (three TF32 tensor-core
products: float32 accuracy; emulated at widths 512 and 256 their error matched the FMA path's, both far
inside the float32 tolerances), float64 dots ``ieee``.
sin/cos take a Cody-Waite reduction by pi/2 and minimax polynomials (float32; ``tl.sin`` may lower
to the approximate hardware instruction, far off at the hundreds of radians these filters reach);
float64 uses ``tl.sin``/``tl.cos``.

Bytes moved per point, float32, hidden width H, one layer, counting each [N, H] operand once
(its re-reads by the ``H / BN`` column programs hit L2): forward reads A (4H) and writes out (4H)
and, for training, lin (4H): 8H-12H, 4-6 KiB at H = 512 (the reference's eager forward makes ~25
reads and writes of [N, H] tensors a layer, ~50 KiB). Backward reads the matmul operand (4H) and lin (4H) and writes dlin and
h (8H): 16H = 8 KiB, plus ``4 IN H / BN`` of row partials.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["gabor_step_fwd", "gabor_step_bwd", "gabor_net_fwd", "gabor_net_bwd", "compile_all"]

BM, BN, BK = 64, 64, 32
_N_COLSUMS = 4  # db, dgamma, colsum dD, colsum dlin; then IN x (dz x_i), IN x (dD x_i)


@triton.jit
def _sincos(z, IS_FP64: tl.constexpr):
    """``(sin z, cos z)``: float64 through ``tl.sin``/``tl.cos``; float32 by reduction to
    ``[-pi/4, pi/4]`` (pi/2 in three parts: exact products for |k| < 2^16) and Cephes polynomials."""
    if IS_FP64:
        s = tl.sin(z)
        c = tl.cos(z)
    else:
        k = tl.floor(z * 0.6366197723675814 + 0.5)
        r = z - k * 1.5703125
        r = r - k * 4.837512969970703125e-4
        r = r - k * 7.54978995489188216e-8
        q = k.to(tl.int32)
        r2 = r * r
        ps = ((-1.9515295891e-4 * r2 + 8.3321608736e-3) * r2 - 1.6666654611e-1) * r2 * r + r
        pc = ((2.443315711809948e-5 * r2 - 1.388731625493765e-3) * r2 + 4.166664568298827e-2) * r2 * r2 - 0.5 * r2 + 1.0
        odd = (q & 1) != 0
        sv = tl.where(odd, pc, ps)
        cv = tl.where(odd, ps, pc)
        s = tl.where((q & 2) != 0, -sv, sv)
        c = tl.where(((q + 1) & 2) != 0, -cv, cv)
    return s, c


@triton.jit
def _filter_tile(x_ptr, w_ptr, b_ptr, mu_ptr, gamma_ptr, rows, cols, rmask, cmask, IN: tl.constexpr):
    """``z = x W^T + b`` and ``D = (|x|^2 + |mu|^2) - 2 x mu^T`` on a ``[BM, BN]`` tile, and gamma."""
    x0 = tl.load(x_ptr + rows * IN, mask=rmask, other=0.0)
    w0 = tl.load(w_ptr + cols * IN, mask=cmask, other=0.0)
    m0 = tl.load(mu_ptr + cols * IN, mask=cmask, other=0.0)
    z = x0[:, None] * w0[None, :]
    dot = x0[:, None] * m0[None, :]
    xx = x0 * x0
    mm = m0 * m0
    for i in tl.static_range(1, IN):
        xi = tl.load(x_ptr + rows * IN + i, mask=rmask, other=0.0)
        wi = tl.load(w_ptr + cols * IN + i, mask=cmask, other=0.0)
        mi = tl.load(mu_ptr + cols * IN + i, mask=cmask, other=0.0)
        z += xi[:, None] * wi[None, :]
        dot += xi[:, None] * mi[None, :]
        xx += xi * xi
        mm += mi * mi
    z += tl.load(b_ptr + cols, mask=cmask, other=0.0)[None, :]
    d = (xx[:, None] + mm[None, :]) - 2.0 * dot
    gamma = tl.load(gamma_ptr + cols, mask=cmask, other=0.0)
    return z, d, gamma


@triton.jit
def _matmul_tile(a_ptr, m_ptr, rows, cols, rmask, cmask, K, stride_mk, stride_mn, acc,
                 BK: tl.constexpr, IS_FP64: tl.constexpr):
    """``acc + A[rows, :] @ M[:, cols]`` with A ``[N, K]`` row-major and M ``[K, H]`` strided."""
    ks = tl.arange(0, BK)
    for k0 in range(0, K, BK):
        kk = k0 + ks
        kmask = kk < K
        a = tl.load(a_ptr + rows[:, None] * K + kk[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        m = tl.load(m_ptr + kk[:, None] * stride_mk + cols[None, :] * stride_mn,
                    mask=kmask[:, None] & cmask[None, :], other=0.0)
        if IS_FP64:
            acc = tl.dot(a, m, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, m, acc, input_precision="tf32x3")
    return acc


@triton.jit
def _tile_ids(N, H, BM: tl.constexpr, BN: tl.constexpr):
    rows = (tl.program_id(0) * BM + tl.arange(0, BM)).to(tl.int64)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    return rows, cols, rows < N, cols < H


@triton.jit
def _gabor_fwd_kernel(x_ptr, w_ptr, b_ptr, mu_ptr, gamma_ptr, a_ptr, lw_ptr, lb_ptr, lin_ptr, out_ptr, N, H, K,
                      IN: tl.constexpr, HAS_LIN: tl.constexpr, HAS_BIAS: tl.constexpr, SAVE_LIN: tl.constexpr,
                      IS_FP64: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """out = g(x) (* (A @ Lw^T + c) when HAS_LIN; lin also stored when SAVE_LIN)."""
    rows, cols, rmask, cmask = _tile_ids(N, H, BM, BN)
    tile = rmask[:, None] & cmask[None, :]
    z, d, gamma = _filter_tile(x_ptr, w_ptr, b_ptr, mu_ptr, gamma_ptr, rows, cols, rmask, cmask, IN)
    s, _ = _sincos(z, IS_FP64)
    g = s * tl.exp(-0.5 * d * gamma[None, :])
    idx = rows[:, None] * H + cols[None, :]
    if HAS_LIN:
        acc = tl.zeros((BM, BN), dtype=tl.float64 if IS_FP64 else tl.float32)
        lin = _matmul_tile(a_ptr, lw_ptr, rows, cols, rmask, cmask, K, 1, K, acc, BK, IS_FP64)
        if HAS_BIAS:
            lin += tl.load(lb_ptr + cols, mask=cmask, other=0.0)[None, :]
        if SAVE_LIN:
            tl.store(lin_ptr + idx, lin, mask=tile)
        g = g * lin
    tl.store(out_ptr + idx, g, mask=tile)


@triton.jit
def _gabor_bwd_kernel(x_ptr, w_ptr, b_ptr, mu_ptr, gamma_ptr, a_ptr, m_ptr, lb_ptr, gh_ptr, lin_ptr, dlin_ptr,
                      h_ptr, pcol_ptr, prow_ptr, N, H, K, stride_mk, stride_mn,
                      IN: tl.constexpr, HAS_MATMUL: tl.constexpr, MATMUL_IS_LIN: tl.constexpr,
                      HAS_LIN: tl.constexpr, HAS_BIAS: tl.constexpr, WRITE_H: tl.constexpr, IS_FP64: tl.constexpr,
                      BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """Filter backward on a tile; the matmul A @ M gives gh, or (MATMUL_IS_LIN) lin (+ c)."""
    rows, cols, rmask, cmask = _tile_ids(N, H, BM, BN)
    tile = rmask[:, None] & cmask[None, :]
    idx = rows[:, None] * H + cols[None, :]
    if HAS_MATMUL:
        acc = tl.zeros((BM, BN), dtype=tl.float64 if IS_FP64 else tl.float32)
        acc = _matmul_tile(a_ptr, m_ptr, rows, cols, rmask, cmask, K, stride_mk, stride_mn, acc, BK, IS_FP64)
    if HAS_MATMUL and not MATMUL_IS_LIN:
        gh = acc
    else:
        gh = tl.load(gh_ptr + idx, mask=tile, other=0.0)
    gh = tl.where(tile, gh, 0.0)  # padding rows and columns contribute nothing to the sums
    z, d, gamma = _filter_tile(x_ptr, w_ptr, b_ptr, mu_ptr, gamma_ptr, rows, cols, rmask, cmask, IN)
    s, c = _sincos(z, IS_FP64)
    e = tl.exp(-0.5 * d * gamma[None, :])
    g = s * e
    col = pcol_ptr + tl.program_id(0) * (4 + 2 * IN) * H + cols
    if HAS_LIN:
        if MATMUL_IS_LIN:
            lin = acc
            if HAS_BIAS:
                lin += tl.load(lb_ptr + cols, mask=cmask, other=0.0)[None, :]
        else:
            lin = tl.load(lin_ptr + idx, mask=tile, other=0.0)
        dlin = gh * g
        tl.store(dlin_ptr + idx, dlin, mask=tile)
        tl.store(col + 3 * H, tl.sum(dlin, axis=0), mask=cmask)
        if WRITE_H:
            tl.store(h_ptr + idx, g * lin, mask=tile)
        dg = gh * lin
    else:
        if WRITE_H:
            tl.store(h_ptr + idx, g, mask=tile)
        dg = gh
    t = dg * g
    dz = dg * c * e
    dd = -0.5 * gamma[None, :] * t
    tl.store(col, tl.sum(dz, axis=0), mask=cmask)
    tl.store(col + H, tl.sum(-0.5 * d * t, axis=0), mask=cmask)
    sum_dd_col = tl.sum(dd, axis=0)
    tl.store(col + 2 * H, sum_dd_col, mask=cmask)
    sum_dd_row = tl.sum(dd, axis=1)
    row = prow_ptr + tl.program_id(1) * N * IN + rows * IN
    for i in tl.static_range(IN):
        xi = tl.load(x_ptr + rows * IN + i, mask=rmask, other=0.0)
        wi = tl.load(w_ptr + cols * IN + i, mask=cmask, other=0.0)
        mi = tl.load(mu_ptr + cols * IN + i, mask=cmask, other=0.0)
        tl.store(col + (4 + i) * H, tl.sum(dz * xi[:, None], axis=0), mask=cmask)
        tl.store(col + (4 + IN + i) * H, tl.sum(dd * xi[:, None], axis=0), mask=cmask)
        dxi = tl.sum(dz * wi[None, :], axis=1) + 2.0 * (sum_dd_row * xi - tl.sum(dd * mi[None, :], axis=1))
        tl.store(row + i, dxi, mask=rmask)


def _grid(N: int, H: int) -> tuple[int, int]:
    return triton.cdiv(N, BM), triton.cdiv(H, BN)


def _filter_fwd(x, w, b, mu, gamma, a=None, lw=None, lb=None, lin_out=None):
    """One layer forward (``a`` None: the bare filter); ``lin_out`` receives lin when given."""
    N, n_in = x.shape
    H = w.shape[0]
    out = x.new_empty(N, H)
    if N == 0:
        return out
    has_lin = a is not None
    with torch.cuda.device_of(x):
        _gabor_fwd_kernel[_grid(N, H)](
            x, w, b, mu, gamma, a if has_lin else x, lw if has_lin else w, lb if lb is not None else b,
            lin_out if lin_out is not None else out, out, N, H, a.shape[1] if has_lin else 1,
            IN=n_in, HAS_LIN=has_lin, HAS_BIAS=lb is not None, SAVE_LIN=lin_out is not None,
            IS_FP64=x.dtype == torch.float64, BM=BM, BN=BN, BK=BK)
    return out


def _filter_bwd(x, w, b, mu, gamma, *, a=None, m=None, matmul_is_lin=False, lb=None, gh=None, lin=None,
                write_h=False):
    """One layer backward. The matmul ``a [N, K] @ m [K, H]`` (``m`` any strides) gives gh, or
    lin when ``matmul_is_lin``; the other comes from ``gh``/``lin``. Returns ``(dlin or None,
    h or None, dx [N, IN], column sums [4 + 2 IN, H])``."""
    N, n_in = x.shape
    H = w.shape[0]
    has_lin = lin is not None or matmul_is_lin
    dlin = x.new_empty(N, H) if has_lin else None
    h = x.new_empty(N, H) if write_h else None
    gm, gn = _grid(N, H)
    pcol = x.new_zeros(gm, _N_COLSUMS + 2 * n_in, H)
    prow = x.new_empty(gn, N, n_in)
    if N > 0:
        has_mm = a is not None
        with torch.cuda.device_of(x):
            _gabor_bwd_kernel[(gm, gn)](
                x, w, b, mu, gamma, a if has_mm else x, m if has_mm else w, lb if lb is not None else b,
                gh if gh is not None else x, lin if lin is not None else x, dlin if has_lin else x, h if write_h else x,
                pcol, prow, N, H, a.shape[1] if has_mm else 1, m.stride(0) if has_mm else 0,
                m.stride(1) if has_mm else 0,
                IN=n_in, HAS_MATMUL=has_mm, MATMUL_IS_LIN=matmul_is_lin, HAS_LIN=has_lin, HAS_BIAS=lb is not None,
                WRITE_H=write_h, IS_FP64=x.dtype == torch.float64, BM=BM, BN=BN, BK=BK)
    return dlin, h, prow.sum(0), pcol.sum(0)


def _param_grads(mu, sums):
    """(d weight, d bias, d mu, d gamma, colsum dlin) of a filter from its column sums."""
    n_in = mu.shape[1]
    dw = sums[_N_COLSUMS:_N_COLSUMS + n_in].T.clone(memory_format=torch.contiguous_format)
    dmu = 2.0 * (sums[2][:, None] * mu - sums[_N_COLSUMS + n_in:].T)
    # clones: op outputs may not be views of one another
    return dw, sums[0].clone(), dmu.contiguous(), sums[1].clone(), sums[3].clone()


def gabor_step_fwd(x, weight, bias, mu, gamma, prev, lin_weight, lin_bias):
    """:func:`fastomni.reference.gabor_filter.gabor_step` on contiguous tensors."""
    return _filter_fwd(x, weight, bias, mu, gamma, prev, lin_weight, lin_bias)


def gabor_step_bwd(grad_out, x, weight, bias, mu, gamma, prev, lin_weight, lin_bias):
    """Gradients of (x, weight, bias, mu, gamma, prev, lin_weight, lin_bias); empty ``[0]`` for
    absent inputs. lin is recomputed in the kernel's matmul, not saved."""
    if prev is None:
        _, _, dx, sums = _filter_bwd(x, weight, bias, mu, gamma, gh=grad_out)
        dw, db, dmu, dgamma, _ = _param_grads(mu, sums)
        return dx, dw, db, dmu, dgamma, x.new_empty(0), x.new_empty(0), x.new_empty(0)
    dlin, _, dx, sums = _filter_bwd(x, weight, bias, mu, gamma, a=prev, m=lin_weight.T, matmul_is_lin=True,
                                    lb=lin_bias, gh=grad_out)
    dw, db, dmu, dgamma, dc = _param_grads(mu, sums)
    return (dx, dw, db, dmu, dgamma, dlin @ lin_weight, dlin.T @ prev,
            dc if lin_bias is not None else x.new_empty(0))


def _forward_layers(x, fw, fb, mu, gamma, lw, lb, lins):
    """h_L of the net; lins ``[L, N, H]`` receives every lin_k when given."""
    h = _filter_fwd(x, fw[0], fb[0], mu[0], gamma[0])
    for k in range(1, len(fw)):
        h = _filter_fwd(x, fw[k], fb[k], mu[k], gamma[k], h, lw[k - 1], lb[k - 1] if lb else None,
                        lins[k - 1] if lins is not None else None)
    return h


def gabor_net_fwd(x, fw, fb, mu, gamma, lw, lb, ow, ob, save_lin):
    """:func:`fastomni.reference.gabor_filter.gabor_net` on contiguous tensors; also returns lins
    ``[L, N, H]`` (``[0, N, H]`` unless ``save_lin``)."""
    N, H = x.shape[0], fw[0].shape[0]
    lins = x.new_empty(len(lw) if save_lin else 0, N, H)
    h = _forward_layers(x, fw, fb, mu, gamma, lw, lb, lins if save_lin else None)
    return torch.addmm(ob, h, ow.T), lins


def gabor_net_bwd(grad_out, x, fw, fb, mu, gamma, lw, lb, ow, ob, lins):
    """Gradients ``(dx, dfw, dfb, dmu, dgamma, dlw, dlb, dow, dob)`` of :func:`gabor_net_fwd`;
    lins empty: recomputed by a forward first."""
    L, N, H = len(lw), x.shape[0], fw[0].shape[0]
    if lins.shape[0] != L:
        lins = x.new_empty(L, N, H)
        _forward_layers(x, fw, fb, mu, gamma, lw, lb, lins)
    dx = torch.zeros_like(x)
    dfw, dfb, dmu, dgamma = [None] * (L + 1), [None] * (L + 1), [None] * (L + 1), [None] * (L + 1)
    dlw, dlb = [None] * L, [None] * L
    a, m, dow = grad_out, ow, None
    for k in range(L, -1, -1):
        dlin, h, dxk, sums = _filter_bwd(x, fw[k], fb[k], mu[k], gamma[k], a=a, m=m,
                                         lin=lins[k - 1] if k > 0 else None, write_h=True)
        dx += dxk
        dfw[k], dfb[k], dmu[k], dgamma[k], dc = _param_grads(mu[k], sums)
        if k == L:
            dow = grad_out.T @ h
        else:
            dlw[k] = a.T @ h  # a = dlin_{k+1}
        if k > 0:
            dlb[k - 1] = dc
            a, m = dlin, lw[k - 1]
    return dx, dfw, dfb, dmu, dgamma, dlw, dlb if lb else [], dow, grad_out.sum(0)


def compile_all(target) -> dict:
    """Compile each kind of kernel specialisation the drivers launch (float32, IN = 3 and 1) for
    ``target`` (e.g. ``GPUTarget("cuda", 90, 32)``) without a GPU: a CI check that the kernels lower."""
    ptrs = {"x_ptr", "w_ptr", "b_ptr", "mu_ptr", "gamma_ptr", "a_ptr", "lw_ptr", "lb_ptr", "lin_ptr", "out_ptr",
            "m_ptr", "gh_ptr", "dlin_ptr", "h_ptr", "pcol_ptr", "prow_ptr"}
    variants = {
        "fwd_bare": (_gabor_fwd_kernel, dict(HAS_LIN=False, HAS_BIAS=False, SAVE_LIN=False)),
        "fwd_lin_save": (_gabor_fwd_kernel, dict(HAS_LIN=True, HAS_BIAS=True, SAVE_LIN=True)),
        "bwd_net": (_gabor_bwd_kernel, dict(HAS_MATMUL=True, MATMUL_IS_LIN=False, HAS_LIN=True, HAS_BIAS=False,
                                            WRITE_H=True)),
        "bwd_net_first": (_gabor_bwd_kernel, dict(HAS_MATMUL=True, MATMUL_IS_LIN=False, HAS_LIN=False,
                                                  HAS_BIAS=False, WRITE_H=True)),
        "bwd_step": (_gabor_bwd_kernel, dict(HAS_MATMUL=True, MATMUL_IS_LIN=True, HAS_LIN=True, HAS_BIAS=True,
                                             WRITE_H=False)),
        "bwd_bare": (_gabor_bwd_kernel, dict(HAS_MATMUL=False, MATMUL_IS_LIN=False, HAS_LIN=False, HAS_BIAS=False,
                                             WRITE_H=False)),
    }
    compiled = {}
    for n_in in (3, 1):
        for name, (fn, flags) in variants.items():
            constexprs = dict(flags, IN=n_in, IS_FP64=False, BM=BM, BN=BN, BK=BK)
            signature = {arg: "constexpr" if arg in constexprs else "*fp32" if arg in ptrs else "i32"
                         for arg in fn.arg_names}
            src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs)
            compiled[f"{name}_in{n_in}"] = triton.compile(src, target=target)
    return compiled
