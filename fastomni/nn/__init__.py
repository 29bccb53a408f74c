"""Drop-in modules of OmniMotion (same constructor arguments and state_dict keys as the original),
and the fast model family on multiresolution grids (:mod:`fastomni.nn.fast`)."""
from fastomni.nn.mfn import GaborLayer, GaborNet
from fastomni.nn.model import Blend, OmniMotion, RayModel, contract
from fastomni.nn.nvp import CouplingLayer, NVPSimplified
from fastomni.nn.fast import FastOmniMotion, GridCouplingNVP, GridField

__all__ = ["GaborLayer", "GaborNet", "NVPSimplified", "CouplingLayer", "OmniMotion", "RayModel", "Blend", "contract",
           "FastOmniMotion", "GridCouplingNVP", "GridField"]
