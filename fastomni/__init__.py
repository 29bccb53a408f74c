"""fastomni: fast dense long-range pixel tracking (OmniMotion) with fused kernels.

``import fastomni`` never compiles anything or touches CUDA; native extensions load lazily.
"""
__version__ = "0.1.0"
