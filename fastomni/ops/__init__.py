"""fastomni's fused ops, each a ``torch.library`` custom op (``fastomni::<op>``) with forward,
explicit backward and a fake (meta) implementation, dispatched between backends by
:mod:`fastomni.ops._registry`."""
from fastomni.ops._registry import BACKENDS, BackendUnavailable, backends, select, use_backend

__all__ = ["BACKENDS", "BackendUnavailable", "backends", "select", "use_backend"]
