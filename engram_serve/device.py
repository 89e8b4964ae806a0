"""The device runtime: every touch of the CUDA runtime goes through one of these, chosen once at
start-up by `get_runtime(device)`.

    runtime.empty(shape, dtype)        a device allocation
    runtime.upload(array)              host -> device (non_blocking: from pinned memory only)
    runtime.download(tensor)           device -> host, blocking: the step's one synchronisation
    runtime.exponential(rows, gens)    Exp(1) noise on the device, one generator per row
    runtime.new_stream(), .stream(s), .current_stream(), .new_event(), .wait_event(stream, ev)
    runtime.record_stream(tensor, s)   a side stream's output used on another stream
    runtime.register_host(ptr, n, ro)  page-lock host memory (cudaHostRegister), .unregister_host
    runtime.host_view(array)           a device tensor over registered host memory (UVA)
    runtime.view_points_at_host(v, a)  whether such a view really is `a`'s host address

Named copies and named streams make every transfer visible (DESIGN.md §6), and one interface is
what lets the CUDA path be proven without a GPU: the tests swap in a recording fake
(tests/fake_cuda.py) that makes FakeTensorMode tensors, counts downloads and checks the
ordering rules (rows used only after their event, staging refilled only after its copy, nothing
unregistered with work in flight). `CpuRuntime` is the CPU path: copies are the identity,
streams and events do nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import torch

# cudaDeviceAttr values (CUDA runtime API, driver_types.h)
ATTR_CAN_USE_HOST_POINTER_FOR_REGISTERED_MEM = 91  # a registered host pointer is a device pointer
ATTR_HOST_REGISTER_READ_ONLY_SUPPORTED = 113  # cudaHostRegisterReadOnly is accepted
HOST_REGISTER_PORTABLE = 0x01
HOST_REGISTER_MAPPED = 0x02
HOST_REGISTER_READ_ONLY = 0x08


class CudaError(RuntimeError):
    """A CUDA runtime call that failed; `code` is its cudaError_t."""

    def __init__(self, what: str, code: int) -> None:
        super().__init__(f"{what} failed with CUDA error {code}")
        self.code = code


def as_host_tensor(array: np.ndarray | torch.Tensor) -> torch.Tensor:
    """A CPU tensor over `array`'s memory (no copy; bfloat16 bits stay 16-bit words)."""
    if isinstance(array, torch.Tensor):
        return array
    return torch.from_numpy(np.ascontiguousarray(array))


class DeviceRuntime(Protocol):
    """What the engine, the model loader and the offload call. CudaRuntime adds host
    registration (`device_attribute`, `register_host`, `unregister_host`, `host_view`,
    `view_points_at_host`), which only offload/pinned.py calls, and only where `is_cuda`."""

    device: torch.device
    is_cuda: bool

    def empty(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor: ...
    def upload(
        self, array: np.ndarray | torch.Tensor, non_blocking: bool = False
    ) -> torch.Tensor: ...
    def upload_into(
        self, dst: torch.Tensor, array: np.ndarray | torch.Tensor, non_blocking: bool = False
    ) -> None: ...
    def download(self, tensor: torch.Tensor) -> np.ndarray: ...
    def generator(self, seed: int) -> Any: ...
    def exponential(self, num_cols: int, generators: Sequence[Any]) -> torch.Tensor: ...
    def new_stream(self) -> Any: ...
    def stream(self, stream: Any) -> contextlib.AbstractContextManager: ...
    def current_stream(self) -> Any: ...
    def new_event(self, timing: bool = False) -> Any: ...
    def wait_event(self, stream: Any, event: Any) -> None: ...
    def wait_stream(self, stream: Any, other: Any) -> None: ...
    def record_stream(self, tensor: torch.Tensor, stream: Any) -> None: ...
    def synchronize(self) -> None: ...


class _NullEvent:
    """The CPU runtime's event: work is done when the call returns."""

    def record(self, stream: Any = None) -> None:
        pass

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass

    def elapsed_time(self, end: Any) -> float:
        return 0.0


class CpuRuntime:
    """The CPU: tensors are host memory, so copies are views and streams do not exist."""

    is_cuda = False

    def __init__(self) -> None:
        self.device = torch.device("cpu")

    def empty(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised tensor on the device (allocations made while building an engine)."""
        return torch.empty(tuple(shape), dtype=dtype, device=self.device)

    def upload(self, array: np.ndarray | torch.Tensor, non_blocking: bool = False) -> torch.Tensor:
        return as_host_tensor(array)

    def upload_into(
        self, dst: torch.Tensor, array: np.ndarray | torch.Tensor, non_blocking: bool = False
    ) -> None:
        dst.copy_(as_host_tensor(array))

    def download(self, tensor: torch.Tensor) -> np.ndarray:
        return tensor.numpy()

    def generator(self, seed: int) -> torch.Generator:
        """torch's CPU generator (MT19937) keeps only a seed's low 32 bits: the seed is mixed
        down to 32 bits first (splitmix64's finaliser), so seeds that differ only above bit 31
        (the API's are 64-bit) draw differently too."""
        return torch.Generator().manual_seed(_mix_to_32_bits(seed))

    def exponential(self, num_cols: int, generators: Sequence[Any]) -> torch.Tensor:
        """[len(generators), num_cols] Exp(1) draws, row i from generators[i]."""
        out = torch.empty(len(generators), num_cols, device=self.device)
        for row, generator in zip(out, generators):
            row.exponential_(generator=generator)
        return out

    def new_stream(self) -> None:
        return None

    def stream(self, stream: Any) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def current_stream(self) -> None:
        return None

    def new_event(self, timing: bool = False) -> _NullEvent:
        return _NullEvent()

    def wait_event(self, stream: Any, event: Any) -> None:
        pass

    def wait_stream(self, stream: Any, other: Any) -> None:
        pass

    def record_stream(self, tensor: torch.Tensor, stream: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass


class CudaRuntime(CpuRuntime):
    """One CUDA device through torch (streams, events, copies) and its cudart binding (host
    registration, device attributes)."""

    is_cuda = True

    def __init__(self, device: torch.device) -> None:
        index = torch.cuda.current_device() if device.index is None else device.index
        self.device = torch.device("cuda", index)
        self._cudart = torch.cuda.cudart()

    def upload(self, array: np.ndarray | torch.Tensor, non_blocking: bool = False) -> torch.Tensor:
        return as_host_tensor(array).to(self.device, non_blocking=non_blocking)

    def upload_into(
        self, dst: torch.Tensor, array: np.ndarray | torch.Tensor, non_blocking: bool = False
    ) -> None:
        dst.copy_(as_host_tensor(array), non_blocking=non_blocking)

    def download(self, tensor: torch.Tensor) -> np.ndarray:
        return tensor.cpu().numpy()

    def generator(self, seed: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(seed)

    def new_stream(self) -> torch.cuda.Stream:
        return torch.cuda.Stream(self.device)

    def stream(self, stream: Any) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if stream is None else torch.cuda.stream(stream)

    def current_stream(self) -> torch.cuda.Stream:
        return torch.cuda.current_stream(self.device)

    def new_event(self, timing: bool = False) -> torch.cuda.Event:
        return torch.cuda.Event(enable_timing=timing)

    def wait_event(self, stream: Any, event: Any) -> None:
        stream.wait_event(event)

    def wait_stream(self, stream: Any, other: Any) -> None:
        stream.wait_stream(other)

    def record_stream(self, tensor: torch.Tensor, stream: Any) -> None:
        tensor.record_stream(stream)

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    # -- host memory -----------------------------------------------------------------------

    def device_attribute(self, attr: int) -> int:
        value = self._cudart.cudaDeviceGetAttribute(attr, self.device.index)
        code, value = value if isinstance(value, tuple) else (0, value)
        _check(code, f"cudaDeviceGetAttribute({attr})")
        return int(value)

    def register_host(self, ptr: int, nbytes: int, flags: int) -> None:
        what = f"cudaHostRegister of {nbytes} bytes (flags {flags:#x})"
        _check(self._cudart.cudaHostRegister(ptr, nbytes, flags), what)

    def unregister_host(self, ptr: int) -> None:
        _check(self._cudart.cudaHostUnregister(ptr), "cudaHostUnregister")

    def host_view(self, array: np.ndarray) -> torch.Tensor:
        """A device tensor over registered, mapped host memory, read in place over UVA."""
        wrapped = array.view(np.int16) if array.dtype == np.uint16 else array
        return torch.as_tensor(
            _CudaArray(int(array.ctypes.data), tuple(array.shape), wrapped.dtype.str),
            device=self.device,
        )

    def view_points_at_host(self, view: torch.Tensor, array: np.ndarray) -> bool:
        """Whether `view` (from `host_view`) starts at `array`'s host address: anywhere else,
        torch would have copied the memory to the device (pinned.cuda_view refuses that)."""
        return view.data_ptr() == array.ctypes.data


class _CudaArray:
    """The minimal `__cuda_array_interface__` torch needs to wrap a raw device address."""

    def __init__(self, ptr: int, shape: tuple[int, ...], typestr: str) -> None:
        self.__cuda_array_interface__ = {
            "shape": shape, "typestr": typestr, "data": (ptr, False), "version": 3,
            "strides": None,
        }  # fmt: skip


def _mix_to_32_bits(seed: int) -> int:
    mask = (1 << 64) - 1
    z = (seed + 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return (z ^ (z >> 31)) & 0xFFFFFFFF


def _check(err: Any, what: str) -> None:
    code = int(getattr(err, "value", err))
    if code != 0:
        raise CudaError(what, code)


def get_runtime(device: str | torch.device) -> DeviceRuntime:
    """The runtime of `device` ("cpu", "cuda", "cuda:1"); a clear error where CUDA is absent."""
    device = torch.device(device)
    if device.type == "cpu":
        return CpuRuntime()
    if device.type != "cuda":
        raise ValueError(f"unsupported device {str(device)!r}: expected cpu or cuda")
    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}"
        raise RuntimeError(
            f"--device {device} needs a CUDA GPU, but this torch ({torch.__version__}, {build}) "
            "sees none; use --device cpu"
        )
    if device.index is not None and device.index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise RuntimeError(f"no {device}: this machine has {count} CUDA devices")
    return CudaRuntime(device)
