"""`linear(x, weight, bias)`: `F.linear`, through the CPU kernels where they apply: a weight kept
quantized (kernels/cpu_quant.py) always, a float32 one for small batches (kernels/cpu_linear.py)
unless prefill_in's dtype runs its batch's products, as the quantized weights' beside it;
`Linear`: an `nn.Linear` that calls it. `Weight` is either kind; `set_weight` and `set_fused`
put one on a module."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import nn

from engram_serve.kernels import cpu_linear, cpu_quant
from engram_serve.kernels.cpu_quant import QuantizedWeight

Weight = torch.Tensor | QuantizedWeight


def linear(x: torch.Tensor, weight: Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    dtype = _prefill_dtype.get()
    if isinstance(weight, QuantizedWeight):  # the kernels take and give float32 activations
        if x.shape[0] == 0:  # a step that samples nothing (prefill chunks only)
            return x.new_empty(0, weight.shape[0])
        return cpu_quant.linear(x.float(), weight, bias, prefill_dtype=dtype).to(x.dtype)
    if (
        weight.dtype == torch.float32
        and dtype != torch.float32
        and cpu_quant.banded(x.shape[0], dtype)
    ):  # a float32 weight among quantized ones (Engram's wkv): its products as theirs
        wide = F.linear(x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))
        return wide.to(x.dtype)
    if cpu_linear.supports(x, weight):
        return cpu_linear.linear_cpu(x, weight, bias)
    return F.linear(x, weight, bias)


_prefill_dtype: ContextVar[torch.dtype] = ContextVar("prefill_dtype", default=torch.float32)


@contextmanager
def prefill_in(dtype: torch.dtype) -> Iterator[None]:
    """Within: products of many rows (cpu_quant.banded: prefill, and in bfloat16 batched decode
    too) of quantized weights, and of float32 ones among them, run in `dtype` (bfloat16: oneDNN
    on AMX or AVX512-BF16), on this thread only."""
    token = _prefill_dtype.set(dtype)
    try:
        yield
    finally:
        _prefill_dtype.reset(token)


def set_weight(module: nn.Module, name: str, value: Weight | None) -> None:
    """module.<name> = value: a tensor as a frozen parameter, a quantized weight as a plain
    attribute (it is no tensor), None to drop it."""
    module._parameters.pop(name, None)
    module.__dict__.pop(name, None)
    if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
        value = nn.Parameter(value, requires_grad=False)
    setattr(module, name, value)


def set_fused(module: nn.Module, name: str, value: Weight | None) -> None:
    """module.<name> = a fused weight or bias: a tensor as a buffer outside the state dict (its
    parts keep their Hugging Face names), a quantized weight as a plain attribute."""
    module._buffers.pop(name, None)
    module.__dict__.pop(name, None)
    if isinstance(value, torch.Tensor) or value is None:
        module.register_buffer(name, value, persistent=False)
    else:
        setattr(module, name, value)


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def current_prefill_dtype() -> torch.dtype:
    """prefill_in's dtype on this thread (float32 outside it)."""
    return _prefill_dtype.get()
