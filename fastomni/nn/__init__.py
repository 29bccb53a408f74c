"""Drop-in modules of OmniMotion: same constructor arguments and state_dict keys as the original."""
from fastomni.nn.mfn import GaborLayer, GaborNet
from fastomni.nn.model import Blend, OmniMotion, contract
from fastomni.nn.nvp import CouplingLayer, NVPSimplified

__all__ = ["GaborLayer", "GaborNet", "NVPSimplified", "CouplingLayer", "OmniMotion", "Blend", "contract"]
