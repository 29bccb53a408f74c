"""fastomni's fused ops, each a ``torch.library`` custom op (``fastomni::<op>``) with forward,
explicit backward and a fake (meta) implementation, dispatched between backends by
:mod:`fastomni.ops._registry`."""
from fastomni.ops._registry import BACKENDS, BackendUnavailable, backends, select, use_backend
from fastomni.ops import affine_coupling, composite, gabor_filter, grid_encode, stratified_sample  # noqa: E402,F401  (registers the ops)

__all__ = ["BACKENDS", "BackendUnavailable", "backends", "select", "use_backend"]
