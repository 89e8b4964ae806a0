"""Checks shared by the kernel wrappers: where a kernel may run, and what its tensors must be.

Triton 3.9 chooses between compiling and interpreting once per function, when `@triton.jit`
decorates it, by reading `TRITON_INTERPRET` then. Its own library (`tl.sum`, `tl.sigmoid`, ...)
is decorated when `triton.language` is first imported, so the variable must be set before
anything imports triton. An interpreted kernel runs on CPU tensors (NumPy, on the host): that is
how the tests check kernels without a GPU. The CPU serving path never launches kernels; it
calls the twins in kernels/reference.py.
"""

from __future__ import annotations

import torch
from triton.runtime.interpreter import InterpretedFunction


def is_interpreted(kernel: object) -> bool:
    """True when `kernel` was decorated under TRITON_INTERPRET=1."""
    return isinstance(kernel, InterpretedFunction)


def check_launch_device(kernel: object, device: torch.device) -> None:
    """Compiled kernels need CUDA tensors, interpreted ones CPU tensors."""
    want = "cpu" if is_interpreted(kernel) else "cuda"
    if device.type != want:
        mode = "interpreted (TRITON_INTERPRET=1)" if want == "cpu" else "compiled"
        hint = "" if want == "cpu" else "; on CPU call its twin in engram_serve.kernels.reference"
        name = getattr(kernel, "__name__", "kernel")
        raise ValueError(
            f"Triton kernel {name} is {mode} and needs {want} tensors, got {device}{hint}"
        )


def check_tensor(
    name: str,
    t: torch.Tensor,
    device: torch.device,
    dtypes: tuple[torch.dtype, ...],
    dim: int | None = None,
) -> None:
    """Raise a clear error unless `t` is a contiguous tensor of one of `dtypes` on `device`."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device}")
    if t.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{name} must be {names}, got {str(t.dtype).removeprefix('torch.')}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name} must have {dim} dimensions, got shape {tuple(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (call .contiguous() first)")
