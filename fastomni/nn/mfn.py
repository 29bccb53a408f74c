"""GaborNet, the multiplicative filter network of OmniMotion, drop-in for ``networks/mfn.py``.

Same constructor arguments, attribute names and state_dict keys as the original
(``filters.{k}.linear``, ``filters.{k}.mu``, ``filters.{k}.gamma``, ``linear.{k}``,
``output_linear``), so an original state dict loads with ``strict=True``. The forward runs the
fused ops :func:`fastomni.ops.gabor_filter.gabor_net` (the whole network in one call) and
:func:`~fastomni.ops.gabor_filter.gabor_step` (one filter bank), on the selected backend.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from fastomni.ops.gabor_filter import gabor_net, gabor_step

__all__ = ["GaborLayer", "GaborNet"]


class GaborLayer(nn.Module):
    """Gabor filter bank ``in_features -> out_features``:
    ``sin(x W^T + b) * exp(-0.5 * gamma * ||x - mu||^2)`` (:func:`fastomni.ops.gabor_filter.gabor_step`)."""

    def __init__(self, in_features: int, out_features: int, weight_scale: float, alpha: float = 1.0,
                 beta: float = 1.0):
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)
        self.mu = nn.Parameter(2 * torch.rand(out_features, in_features) - 1)
        self.gamma = nn.Parameter(torch.distributions.Gamma(alpha, beta).sample((out_features,)))
        with torch.no_grad():
            self.linear.weight.mul_(weight_scale * torch.sqrt(self.gamma[:, None]))
            self.linear.bias.uniform_(-math.pi, math.pi)

    def forward(self, x: Tensor) -> Tensor:
        """x: ``[..., in]`` -> ``[..., out]``."""
        return gabor_step(x, self.linear.weight, self.linear.bias, self.mu, self.gamma)


class GaborNet(nn.Module):
    """Multiplicative filter network: ``out = g_0(x)``; ``out = g_k(x) * linear_{k-1}(out)`` for
    ``k = 1..n_layers``; returns ``output_linear(out)`` (``sin`` of it if ``output_act``).

    x: ``[..., in_size]`` -> ``[..., out_size]``.
    """

    def __init__(self, in_size: int, hidden_size: int, out_size: int, n_layers: int = 3,
                 input_scale: float = 256.0, weight_scale: float = 1.0, alpha: float = 6.0,
                 beta: float = 1.0, bias: bool = True, output_act: bool = False):
        super().__init__()
        self.linear = nn.ModuleList([nn.Linear(hidden_size, hidden_size, bias) for _ in range(n_layers)])
        self.output_linear = nn.Linear(hidden_size, out_size)
        self.output_act = output_act
        bound = math.sqrt(weight_scale / hidden_size)
        with torch.no_grad():
            for lin in self.linear:
                lin.weight.uniform_(-bound, bound)
        self.filters = nn.ModuleList([
            GaborLayer(in_size, hidden_size, input_scale / math.sqrt(n_layers + 1), alpha / (n_layers + 1), beta)
            for _ in range(n_layers + 1)
        ])

    def forward(self, x: Tensor) -> Tensor:
        out = gabor_net(x, [f.linear.weight for f in self.filters], [f.linear.bias for f in self.filters],
                        [f.mu for f in self.filters], [f.gamma for f in self.filters],
                        [lin.weight for lin in self.linear],
                        [lin.bias for lin in self.linear if lin.bias is not None],
                        self.output_linear.weight, self.output_linear.bias)
        return torch.sin(out) if self.output_act else out
