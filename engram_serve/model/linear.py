"""`linear(x, weight, bias)`: `F.linear`, through the CPU kernel for small batches
(kernels/cpu_linear.py) where it applies; `Linear`: an `nn.Linear` that calls it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engram_serve.kernels import cpu_linear


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    if cpu_linear.supports(x, weight):
        return cpu_linear.linear_cpu(x, weight, bias)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
