"""Every Triton launch of every op, recorded (tests run them under ``TRITON_INTERPRET=1``): how the
compiled kernel would type its scalar arguments, and on which device it would run.

- Scalars: a compiled Triton kernel types a Python float argument as fp32, whatever the tensors'
  dtype, so a float64 kernel given ``0.01`` would compute with 0.009999999776 (the interpreter keeps
  the exact value, so only this check sees it). No float64 launch may pass a scalar typed fp32.
- Device: Triton launches on the *current* CUDA device; every launch must happen inside
  ``torch.cuda.device_of`` one of its tensors (faked here: the CPU tensors of the interpreter go
  through the same context manager, which records the device it was given).
"""
from __future__ import annotations

import contextlib
import inspect

import pytest
import torch

from conftest import backend_device
from fastomni.ops import use_backend

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture
def launches(monkeypatch):
    """Records every Triton launch: (kernel name, {run-time argument: value}, device entered with device_of)."""
    triton = pytest.importorskip("triton", reason="triton is not installed")
    from fastomni.kernels import affine_coupling, composite, gabor_filter, grid_encode, stratified_sample

    records, entered = [], []

    class RecordingDeviceOf(contextlib.AbstractContextManager):
        def __init__(self, obj):
            self.device = obj.device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            entered.pop()
            return False

    monkeypatch.setattr(torch.cuda, "device_of", RecordingDeviceOf)
    kernel_types = set()
    for module in (affine_coupling, composite, gabor_filter, grid_encode, stratified_sample):
        for value in vars(module).values():
            if isinstance(value, triton.runtime.KernelInterface):
                kernel_types.add(type(value))
    assert kernel_types
    for cls in kernel_types:
        original = cls.run

        def run(self, *args, grid, warmup, _original=original, **kwargs):
            params = inspect.signature(self.fn).parameters
            bound = {name: value for name, value in dict(zip(self.arg_names, args), **kwargs).items()
                     if name in params and "constexpr" not in str(params[name].annotation)}  # run-time arguments
            records.append((self.__name__, bound, entered[-1] if entered else None))
            return _original(self, *args, grid=grid, warmup=warmup, **kwargs)

        monkeypatch.setattr(cls, "run", run)
    return records


def _run_each_op(dtype):
    """Forward and backward of every op through the triton backend, small inputs."""
    import test_affine_coupling as tac
    import test_composite as tco
    import test_gabor_filter as tgf
    import test_grid_encode as tge
    import test_stratified_sample as tss
    from fastomni.ops.affine_coupling import affine_coupling
    from fastomni.ops.composite import composite
    from fastomni.ops.gabor_filter import gabor_net, gabor_step
    from fastomni.ops.grid_encode import grid_encode
    from fastomni.ops.stratified_sample import stratified_sample

    def backward(out):
        outs = out if isinstance(out, (tuple, list)) else [out]
        sum(o.sum() for o in outs if o.requires_grad).backward()

    with use_backend("triton"):
        args = tac._layer(2, 5, dtype, "cpu")
        for t in tac._leaves(args):
            t.requires_grad_()
        backward(affine_coupling(*args, 1, False))
        density, colors, points, mask = tco._inputs((3,), 5, 3, 3, dtype, "cpu", masked=True)
        for t in (density, colors, points):
            t.requires_grad_()
        backward(composite(density, colors, points, mask, select_max=False))
        params = tgf._net_params(5, 3, 8, 2, 2, True, dtype, "cpu")
        for t in tgf._leaves(params):
            t.requires_grad_()
        backward(gabor_net(*params))
        step = tgf._step_params(5, 3, 7, 7, "bias", dtype, "cpu")
        for t in step:
            if t is not None:
                t.requires_grad_()
        backward(gabor_step(*step))
        x, table, res, off = tge._inputs(7, 3, 2, dtype, "cpu")
        x.requires_grad_()
        table.requires_grad_()
        backward(grid_encode(x, table, res, off))
        px = tss._pixels((4,), dtype, "cpu").requires_grad_()
        backward(stratified_sample(px, tss.H, tss.W, 5, 0.0, 2.0, noise=tss._noise((4,), 5, dtype, "cpu"))[0])


KERNELS = {"_coupling_fwd_kernel", "_coupling_bwd_recompute_kernel", "_coupling_bwd_kernel",
           "_composite_fwd_kernel", "_composite_bwd_kernel",
           "_gabor_fwd_kernel", "_gabor_bwd_kernel", "_grid_fwd_kernel", "_grid_bwd_kernel",
           "_stratified_fwd_kernel", "_stratified_bwd_kernel"}


def test_triton_float64_launches_type_no_scalar_fp32(launches):
    backend_device("affine_coupling", "triton")  # skips unless Triton can run here
    from triton.runtime.jit import mangle_type

    _run_each_op(torch.float64)
    assert {name for name, _, _ in launches} == KERNELS
    for name, args, _ in launches:
        types = {arg: mangle_type(value) for arg, value in args.items()
                 if not isinstance(value, torch.Tensor) and isinstance(value, (int, float))}
        fp32 = {arg: value for arg, value in args.items() if types.get(arg) == "fp32"}
        assert not fp32, f"{name}: float64 launch passes {fp32}, typed fp32 when compiled"


def test_triton_launches_run_on_their_tensors_device(launches):
    backend_device("affine_coupling", "triton")
    _run_each_op(torch.float32)
    assert {name for name, _, _ in launches} == KERNELS
    for name, args, device in launches:
        devices = {v.device for v in args.values() if isinstance(v, torch.Tensor)}
        assert device is not None, f"{name} launched outside torch.cuda.device_of"
        assert devices == {device}, f"{name}: tensors on {devices}, launched under device_of({device})"


def test_device_of_selects_the_tensors_gpu(monkeypatch):
    """What the launches rely on: device_of(t) makes t's GPU current (here a fake cuda:1 tensor),
    and is a no-op for CPU tensors."""
    selected = []
    monkeypatch.setattr(torch.cuda, "_exchange_device", lambda idx: selected.append(idx) or -1)
    monkeypatch.setattr(torch.cuda, "_maybe_exchange_device", lambda idx: idx)

    class FakeCudaTensor:
        is_cuda = True

        def get_device(self):
            return 1

    with torch.cuda.device_of(FakeCudaTensor()):
        pass
    with torch.cuda.device_of(torch.zeros(1)):
        pass
    assert selected == [1, -1]
