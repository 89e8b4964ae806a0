"""A recording fake of the CUDA device runtime, so the engine's CUDA path runs on a CPU machine.

`FakeCudaRuntime` has the public methods of `engram_serve.device.CudaRuntime`. Inside its
`active()` context, torch's `FakeTensorMode` makes `cuda` tensors without a GPU (shapes, dtypes
and devices are tracked, contents are not; `.item()` and a cpu/cuda mix raise), and the fake
checks the rules the real runtime enforces or the design promises:

- every host synchronisation is counted by kind (`syncs`, `sync_kinds`): downloads, blocking
  uploads, non-blocking uploads from pageable memory, event and device synchronisation, and a
  copy either way made by a torch op behind the runtime's back;
- streams are vector clocks: a tensor written on one stream and read on another before an event
  (or a host synchronisation) orders the two raises `OrderingError`;
- a non-blocking upload from registered memory is in flight until a synchronisation covers it,
  and its host buffer must not change meanwhile (a staging buffer is refilled only after its
  copy's event);
- host registration follows cudaHostRegister's errors, and nothing is unregistered with work in
  flight.

The fake never completes work by itself: work is complete only when a synchronisation the program
asked for covers it, so `event.query()` is False until then, and `assert_idle()` says whether
anything is still in flight.

A CPU-only build cannot index a fake `cuda` tensor in Python (`Tensor.__getitem__` takes a CUDA
device guard, as do `copy_`, `contiguous` and `to`), so `active()` also enters `AtenMethods`,
which rewrites them into the aten ops they stand for.
"""

from __future__ import annotations

import contextlib
import ctypes
import operator
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

from engram_serve import device as dev

aten = torch.ops.aten

# cudaError_t values the fake raises (driver_types.h)
ERROR_INVALID_VALUE = 1
ERROR_HOST_MEMORY_ALREADY_REGISTERED = 712
ERROR_HOST_MEMORY_NOT_REGISTERED = 713
ERROR_NOT_SUPPORTED = 801

DEFAULT_ATTRIBUTES = {
    dev.ATTR_CAN_USE_HOST_POINTER_FOR_REGISTERED_MEM: 1,
    dev.ATTR_HOST_REGISTER_READ_ONLY_SUPPORTED: 1,
}


class OrderingError(AssertionError):
    """Work the GPU could run in an order the program does not enforce: a tensor read on one
    stream before the event that orders its write on another, a host buffer rewritten while its
    copy was in flight, host memory unregistered with work in flight."""


class FakeStream:
    """A CUDA stream as a vector clock: `clock[s]` is the position of stream s (the number of ops
    enqueued on it) that this stream's next op is ordered after; `clock[self]` is its own
    position. Waits go through the runtime (`wait_event`, `wait_stream`), as in the engine."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.clock: dict[FakeStream, int] = {self: 0}

    @property
    def position(self) -> int:
        return self.clock[self]

    def enqueue(self) -> int:
        """One more op on this stream; its position."""
        self.clock[self] += 1
        return self.clock[self]

    def merge(self, clock: dict[FakeStream, int]) -> None:
        """Order this stream's next ops after everything `clock` covers."""
        for stream, position in clock.items():
            self.clock[stream] = max(self.clock.get(stream, 0), position)

    def __repr__(self) -> str:
        return f"<FakeStream {self.name} at {self.position}>"


class FakeEvent:
    """A CUDA event: recording captures its stream's clock; it is complete once a host
    synchronisation covered that clock (a never-recorded event is complete, as in CUDA)."""

    def __init__(self, runtime: FakeCudaRuntime, timing: bool) -> None:
        self._runtime = runtime
        self.timing = timing
        self.clock: dict[FakeStream, int] | None = None

    def record(self, stream: FakeStream | None = None) -> None:
        self.clock = self._runtime._record(self._runtime._stream_or_current(stream))

    def query(self) -> bool:
        return self.clock is None or self._runtime._is_complete(self.clock)

    def synchronize(self) -> None:
        self._runtime._sync("event_sync", self.clock or {})

    def elapsed_time(self, end: FakeEvent) -> float:
        """0.0, with the checks of torch.cuda.Event.elapsed_time."""
        if not (self.timing and end.timing):
            raise RuntimeError("Both events must be created with argument 'enable_timing=True'.")
        if self.clock is None or end.clock is None:
            raise RuntimeError("Both events must be recorded before calculating elapsed time.")
        if not (self.query() and end.query()):
            raise RuntimeError("Both events must be completed before calculating elapsed time.")
        return 0.0


class FakeGenerator:
    """A CUDA generator (a CPU-only build cannot make one): a seed bound to its runtime."""

    def __init__(self, runtime: FakeCudaRuntime, seed: int) -> None:
        self.runtime = runtime
        self.device = runtime.device
        self._seed = seed

    def initial_seed(self) -> int:
        return self._seed


@dataclass(frozen=True)
class _HostSource:
    """The host side of an upload: what the DMA engine reads. `address` is None where there is
    no real memory to point at (a fake CPU tensor); `keep` holds the memory alive."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    address: int | None
    nbytes: int
    keep: object


@dataclass(frozen=True, eq=False)
class _InFlightCopy:
    """A non-blocking upload from registered memory, not yet known complete."""

    stream: FakeStream
    position: int
    source: _HostSource
    snapshot: bytes

    def rewritten(self) -> bool:
        return ctypes.string_at(self.source.address, self.source.nbytes) != self.snapshot


class FakeCudaRuntime:
    """`CudaRuntime` on a CPU machine: fake device tensors, counted syncs, checked ordering.

    `attributes` answers `device_attribute` (default: host pointers usable on the device, and
    read-only registration supported); `fill(tensor)` gives a download's contents (default
    zeros). Methods that make device tensors enter `active()` themselves, so they work from any
    thread; the current stream is per thread, as in CUDA.
    """

    is_cuda = True

    def __init__(
        self,
        attributes: dict[int, int] | None = None,
        fill: Callable[[torch.Tensor], Any] | None = None,
    ) -> None:
        self.device = torch.device("cuda", 0)
        self.attributes = dict(DEFAULT_ATTRIBUTES if attributes is None else attributes)
        self._fill = fill
        self._fake_mode = FakeTensorMode(allow_non_fake_inputs=False)
        self._local = threading.local()
        self._lock = threading.RLock()
        self.default_stream = FakeStream("default")
        self._streams = [self.default_stream]
        self._completed: dict[FakeStream, int] = {}
        self._in_flight: list[_InFlightCopy] = []
        self._registered: dict[int, int] = {}  # host address -> bytes
        self._writes = WeakIdKeyDictionary()  # storage -> (stream, position) of its last write
        self._host_addresses = WeakIdKeyDictionary()  # storage of a host view -> host address
        self.reset_counts()

    # -- modes -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Fake tensors, stream tracking and `AtenMethods` in this thread; re-entering is a
        no-op. One FakeTensorMode serves every thread, so tensors pass between threads."""
        if getattr(self._local, "active", False):
            yield
            return
        self._local.active = True
        try:
            with self._fake_mode, _StreamTracker(self), AtenMethods():
                yield
        finally:
            self._local.active = False

    def reset_counts(self) -> None:
        self.syncs = 0
        self.sync_kinds: Counter[str] = Counter()
        self.uploads = 0
        self.upload_bytes = 0
        self.downloads = 0
        self.record_streams = 0

    def assert_idle(self) -> None:
        """Raise AssertionError if any stream has work no synchronisation has covered."""
        busy = self._busy_streams()
        if busy:
            raise AssertionError(f"work in flight on {busy}")

    def view_points_at_host(self, view: torch.Tensor, array: np.ndarray) -> bool:
        """Whether `view` (from `host_view`, or a view of one) starts at `array`'s host address:
        what `view.data_ptr() == array.ctypes.data` says on a GPU (fake tensors have no data)."""
        base = self._host_addresses.get(view.untyped_storage())
        offset = view.storage_offset() * view.element_size()
        return base is not None and base + offset == array.ctypes.data

    # -- copies ----------------------------------------------------------------------------

    def empty(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        return self._new_tensor(tuple(shape), dtype)

    def upload(self, array: np.ndarray | torch.Tensor, non_blocking: bool = False) -> torch.Tensor:
        source = _host_source(array)
        tensor = self._new_tensor(source.shape, source.dtype)
        self._copy_in(tensor, source, non_blocking)
        return tensor

    def upload_into(
        self, dst: torch.Tensor, array: np.ndarray | torch.Tensor, non_blocking: bool = False
    ) -> None:
        source = _host_source(array)
        if dst.device.type != "cuda":
            raise ValueError(f"upload_into a {dst.device} tensor: the destination is on the device")
        if (tuple(dst.shape), dst.dtype) != (source.shape, source.dtype):
            raise ValueError(
                f"upload_into {tuple(dst.shape)} {dst.dtype} from {source.shape} {source.dtype}"
            )
        self._check_reads([dst], self.current_stream(), "upload_into")
        self._copy_in(dst, source, non_blocking)

    def download(self, tensor: torch.Tensor) -> np.ndarray:
        """A blocking copy on the current stream: the host waits for the stream and everything
        it has waited on."""
        if tensor.device.type != "cuda":
            raise ValueError(f"download of a {tensor.device} tensor: downloads are of the device")
        stream = self.current_stream()
        self._check_reads([tensor], stream, "download")
        with self._lock:
            stream.enqueue()
            self.downloads += 1
        self._sync("download", stream.clock)
        return self._contents(tensor)

    # -- generators ------------------------------------------------------------------------

    def generator(self, seed: int) -> FakeGenerator:
        return FakeGenerator(self, seed)

    def exponential(self, num_cols: int, generators: Sequence[Any]) -> torch.Tensor:
        """[len(generators), num_cols] draws, written on the current stream."""
        for generator in generators:
            if not (isinstance(generator, FakeGenerator) and generator.runtime is self):
                raise ValueError(f"{generator!r} is not a generator of this {self.device} runtime")
        return self._new_tensor((len(generators), num_cols), torch.get_default_dtype())

    # -- streams and events ----------------------------------------------------------------

    def new_stream(self) -> FakeStream:
        stream = FakeStream(f"stream{len(self._streams)}")
        self._streams.append(stream)
        return stream

    @contextlib.contextmanager
    def stream(self, stream: FakeStream | None) -> Iterator[None]:
        if stream is None:
            yield
            return
        previous = self.current_stream()
        self._local.stream = self._checked(stream)
        try:
            yield
        finally:
            self._local.stream = previous

    def current_stream(self) -> FakeStream:
        return getattr(self._local, "stream", self.default_stream)

    def new_event(self, timing: bool = False) -> FakeEvent:
        return FakeEvent(self, timing)

    def wait_event(self, stream: FakeStream, event: FakeEvent) -> None:
        if event.clock is not None:
            with self._lock:
                self._checked(stream).merge(event.clock)

    def wait_stream(self, stream: FakeStream, other: FakeStream) -> None:
        with self._lock:
            self._checked(stream).merge(self._checked(other).clock)

    def record_stream(self, tensor: torch.Tensor, stream: FakeStream) -> None:
        if tensor.device.type != "cuda":
            raise ValueError(f"record_stream of a {tensor.device} tensor")
        self._checked(stream)
        with self._lock:
            self.record_streams += 1

    def synchronize(self) -> None:
        self._sync("device_sync", {stream: stream.position for stream in self._streams})

    # -- host memory -----------------------------------------------------------------------

    def device_attribute(self, attr: int) -> int:
        if attr not in self.attributes:
            raise dev.CudaError(f"cudaDeviceGetAttribute({attr})", ERROR_INVALID_VALUE)
        return self.attributes[attr]

    def register_host(self, ptr: int, nbytes: int, flags: int) -> None:
        what = f"cudaHostRegister of {nbytes} bytes (flags {flags:#x})"
        read_only_ok = self.attributes.get(dev.ATTR_HOST_REGISTER_READ_ONLY_SUPPORTED, 0)
        if flags & dev.HOST_REGISTER_READ_ONLY and not read_only_ok:
            raise dev.CudaError(what, ERROR_NOT_SUPPORTED)
        if any(
            ptr < start + size and start < ptr + nbytes for start, size in self._registered.items()
        ):
            raise dev.CudaError(what, ERROR_HOST_MEMORY_ALREADY_REGISTERED)
        self._registered[ptr] = nbytes

    def unregister_host(self, ptr: int) -> None:
        if ptr not in self._registered:
            raise dev.CudaError("cudaHostUnregister", ERROR_HOST_MEMORY_NOT_REGISTERED)
        busy = self._busy_streams()
        if busy:
            raise OrderingError(f"host memory at {ptr:#x} unregistered with work in flight: {busy}")
        del self._registered[ptr]

    def host_view(self, array: np.ndarray) -> torch.Tensor:
        """A fake device tensor standing for registered host memory read in place (UVA). The
        real view assumes C order, so a strided array is refused here."""
        address, nbytes = array.ctypes.data, array.nbytes
        if not self._is_registered(address, nbytes):
            what = f"host_view of {nbytes} bytes at {address:#x} outside registered memory"
            raise dev.CudaError(what, ERROR_INVALID_VALUE)
        if not self.attributes.get(dev.ATTR_CAN_USE_HOST_POINTER_FOR_REGISTERED_MEM, 0):
            raise dev.CudaError("host_view: registered host pointers", ERROR_NOT_SUPPORTED)
        if not array.flags.c_contiguous:
            raise ValueError(f"host_view of a strided array {array.strides}: it must be C order")
        wrapped = array.dtype if array.dtype != np.uint16 else np.dtype(np.int16)  # as CudaRuntime
        view = self._new_tensor(tuple(array.shape), _torch_dtype(wrapped))
        self._host_addresses[view.untyped_storage()] = address
        return view

    # -- bookkeeping -----------------------------------------------------------------------

    def _new_tensor(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A fake device tensor, written by one op (its allocation) on the current stream."""
        with self.active():
            return torch.empty(shape, dtype=dtype, device=self.device)

    def _copy_in(self, dst: torch.Tensor, source: _HostSource, non_blocking: bool) -> None:
        """Enqueue host -> `dst` on the current stream. A blocking copy waits for the stream
        (torch syncs after it); a non-blocking one from pageable memory waits for the stream
        before it starts (CUDA stages it); from registered memory it is in flight."""
        stream = self.current_stream()
        before = dict(stream.clock)
        position = self._write([dst], stream)
        with self._lock:
            self.uploads += 1
            self.upload_bytes += source.nbytes
        if not non_blocking:
            self._sync("blocking_upload", stream.clock)
        elif source.address is None or not self._is_registered(source.address, source.nbytes):
            self._sync("pageable_copy", before)
        else:
            snapshot = ctypes.string_at(source.address, source.nbytes)
            with self._lock:
                self._in_flight.append(_InFlightCopy(stream, position, source, snapshot))

    def _contents(self, tensor: torch.Tensor) -> np.ndarray:
        dtype = _numpy_dtype(tensor.dtype)
        shape = tuple(tensor.shape)
        if self._fill is None:
            return np.zeros(shape, dtype)
        contents = np.asarray(self._fill(tensor), dtype)
        if contents.shape != shape:
            raise ValueError(f"fill gave {contents.shape} for a {shape} tensor")
        return contents

    def _record(self, stream: FakeStream) -> dict[FakeStream, int]:
        """Record an event on `stream`: one op; the clock it captures."""
        with self._lock:
            stream.enqueue()
            return dict(stream.clock)

    def _write(self, tensors: Sequence[torch.Tensor], stream: FakeStream) -> int:
        """One op on `stream` writing `tensors` (their whole storage); its position."""
        with self._lock:
            position = stream.enqueue()
            for tensor in tensors:
                self._writes[tensor.untyped_storage()] = (stream, position)
            return position

    def _check_reads(self, tensors: Sequence[torch.Tensor], stream: FakeStream, op: object) -> None:
        """Each tensor's last write must be ordered before `stream`'s next op: on the same
        stream, seen through an event or a stream wait, or completed by a host sync."""
        for tensor in tensors:
            write = self._writes.get(tensor.untyped_storage())
            if write is None:
                continue
            writer, position = write
            seen = stream.clock.get(writer, 0)
            if seen < position and self._completed.get(writer, 0) < position:
                raise OrderingError(
                    f"{op}: a tensor is read on stream {stream.name} before the event of stream "
                    f"{writer.name} that orders its write (write at {position}, seen to {seen})"
                )

    def _sync(self, kind: str, clock: dict[FakeStream, int]) -> None:
        """The host waits until `clock`: counted, and everything it covers is complete."""
        with self._lock:
            self.syncs += 1
            self.sync_kinds[kind] += 1
            self._complete(clock)

    def _complete(self, clock: dict[FakeStream, int]) -> None:
        """Mark `clock` complete and check the copies that completes: their host buffers must
        be as they were when each copy was enqueued."""
        with self._lock:
            for stream, position in clock.items():
                self._completed[stream] = max(self._completed.get(stream, 0), position)
            pending, done = [], []
            for copy in self._in_flight:
                complete = self._is_complete({copy.stream: copy.position})
                (done if complete else pending).append(copy)
            self._in_flight = pending
        for copy in done:
            if copy.rewritten():
                raise OrderingError(
                    f"host buffer rewritten while its copy was in flight: {copy.source.nbytes} "
                    f"bytes at {copy.source.address:#x} on stream {copy.stream.name} "
                    "(refill staging only after its copy's event)"
                )

    def _is_complete(self, clock: dict[FakeStream, int]) -> bool:
        return all(self._completed.get(stream, 0) >= position for stream, position in clock.items())

    def _busy_streams(self) -> list[FakeStream]:
        return [s for s in self._streams if self._completed.get(s, 0) < s.position]

    def _is_registered(self, address: int, nbytes: int) -> bool:
        return any(
            start <= address and address + nbytes <= start + size
            for start, size in self._registered.items()
        )

    def _stream_or_current(self, stream: FakeStream | None) -> FakeStream:
        return self.current_stream() if stream is None else self._checked(stream)

    def _checked(self, stream: FakeStream) -> FakeStream:
        if stream not in self._streams:
            raise TypeError(f"{stream!r} is not a stream of this fake runtime")
        return stream


class _StreamTracker(TorchDispatchMode):
    """Every op that writes a device tensor is one op on the current stream: its reads are
    checked against the writers' streams, and its writes are tagged with (stream, position).
    View ops and metadata queries enqueue nothing (no kernel runs). A transfer the runtime did
    not make is counted as a sync, completing nothing (the fake cannot tell a blocking copy from
    one with pinned memory): an op that reads device tensors into host ones ("device_to_host"),
    and one that writes device tensors from a host tensor ("host_to_device"; a 0-dim one is a
    scalar argument, not a copy)."""

    def __init__(self, runtime: FakeCudaRuntime) -> None:
        super().__init__()
        self.runtime = runtime

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.is_view:
            return func(*args, **kwargs)
        result = func(*args, **kwargs)
        runtime, stream = self.runtime, self.runtime.current_stream()
        reads = _tensors((args, kwargs), "cuda")
        writes = _tensors((result, _written_args(func, args, kwargs)), "cuda")
        if writes:
            runtime._check_reads(reads, stream, func)
            if any(t.dim() > 0 for t in _tensors((args, kwargs), "cpu")):
                runtime._sync("host_to_device", {})
            runtime._write(writes, stream)
        elif reads and _tensors(result, "cpu"):
            runtime._check_reads(reads, stream, func)
            runtime._sync("device_to_host", {})
        return result


def _tensors(tree: object, device_type: str) -> list[torch.Tensor]:
    return [
        t for t in tree_leaves(tree) if isinstance(t, torch.Tensor) and t.device.type == device_type
    ]


def _written_args(func: Any, args: tuple, kwargs: dict) -> list[object]:
    """The arguments `func`'s schema marks as written (in-place and out= ops)."""
    written = []
    for i, arg in enumerate(func._schema.arguments):
        if arg.alias_info is not None and arg.alias_info.is_write:
            written.append(args[i] if i < len(args) else kwargs.get(arg.name))
    return written


# -- host memory -------------------------------------------------------------------------------


def _host_source(array: np.ndarray | torch.Tensor) -> _HostSource:
    if isinstance(array, np.ndarray):
        contiguous = np.ascontiguousarray(array)  # a copy (pageable) where `array` is strided
        dtype = _torch_dtype(contiguous.dtype)
        return _HostSource(
            array.shape, dtype, contiguous.ctypes.data, contiguous.nbytes, contiguous
        )
    if array.device.type != "cpu":
        raise ValueError(f"upload of a {array.device} tensor: uploads are of host memory")
    real = not isinstance(array, FakeTensor) and array.is_contiguous()
    nbytes = array.numel() * array.element_size()
    address = array.data_ptr() if real else None
    return _HostSource(tuple(array.shape), array.dtype, address, nbytes, array)


def _torch_dtype(dtype: np.dtype) -> torch.dtype:
    """The dtype torch.from_numpy gives (uint16 stays uint16: bfloat16 bits)."""
    with unset_fake_temporarily():
        return torch.from_numpy(np.empty(0, dtype)).dtype


def _numpy_dtype(dtype: torch.dtype) -> np.dtype:
    """The dtype `.numpy()` gives; a TypeError for dtypes numpy lacks (bfloat16), as on a GPU."""
    with unset_fake_temporarily():
        return torch.empty(0, dtype=dtype).numpy().dtype


# -- tensor methods --------------------------------------------------------------------------


class AtenMethods(TorchFunctionMode):
    """The tensor methods whose Python bindings take a CUDA device guard, which a CPU-only build
    cannot make (so they fail on fake `cuda` tensors), as the aten ops they stand for.

    Indexing follows torch's C++ indexing, in its order: ints select, slices slice, None
    unsqueezes, Ellipsis fills, and index tensors (broadcast together) make one
    `index`/`index_put_`. A 0-dim integer index tensor is read with `.item()` (a host sync, as
    in torch) and a bool mask goes through `nonzero` (a data-dependent shape): under
    FakeTensorMode both raise, as does a tensor slice bound. Anything else (lists, Python
    bools): NotImplementedError naming the index. `copy_`, `contiguous` and `to` become `copy_`,
    `clone` and `_to_copy`, so a hidden transfer reaches the stream tracker's counts; `~` is
    `bitwise_not`."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        rewrite = _REWRITES.get(func, func)
        return rewrite(*args, **(kwargs or {}))


def _copy(tensor: torch.Tensor, src: torch.Tensor, non_blocking: bool = False) -> torch.Tensor:
    return aten.copy_.default(tensor, src, non_blocking)


def _contiguous(
    tensor: torch.Tensor, memory_format: torch.memory_format = torch.contiguous_format
) -> torch.Tensor:
    if tensor.is_contiguous(memory_format=memory_format):
        return tensor
    return aten.clone.default(tensor, memory_format=memory_format)


def _to(tensor: torch.Tensor, *args: Any, copy: bool = False, **kwargs: Any) -> torch.Tensor:
    """`Tensor.to`: the tensor itself where nothing changes, else one `_to_copy`."""
    device, dtype, non_blocking, memory_format = torch._C._nn._parse_to(*args, **kwargs)
    if device is None or (device.type == tensor.device.type and device.index is None):
        device = tensor.device
    dtype = tensor.dtype if dtype is None else dtype
    if not copy and memory_format is None and (device, dtype) == (tensor.device, tensor.dtype):
        return tensor
    return aten._to_copy.default(
        tensor, dtype=dtype, device=device, non_blocking=non_blocking, memory_format=memory_format
    )


def _getitem(tensor: torch.Tensor, index: object) -> torch.Tensor:
    view, indices = _apply_index(tensor, index)
    if indices is not None:
        return aten.index.Tensor(view, indices)
    return aten.alias.default(view) if view is tensor else view


def _setitem(tensor: torch.Tensor, index: object, value: object) -> None:
    view, indices = _apply_index(tensor, index)
    if isinstance(value, torch.Tensor):
        value = _strip_leading_ones(value)
    if indices is not None:
        if not isinstance(value, torch.Tensor):
            value = torch.full((), value, dtype=view.dtype, device=view.device)
        aten.index_put_.default(view, indices, value)
    elif _is_host_scalar(value):
        view.fill_(value)
    else:
        aten.copy_.default(view, value)


def _apply_index(tensor: torch.Tensor, index: object) -> tuple[torch.Tensor, list | None]:
    """The view the basic items select, and the index list (None for untouched dims) the
    index tensors leave for one advanced index, or None if there are none."""
    view, dim, indices = tensor, 0, []
    for item in _expand_ellipsis(index, tensor.dim()):
        if item is None:
            view = aten.unsqueeze.default(view, dim)
            dim += 1
        elif isinstance(item, slice):
            view = aten.slice.Tensor(view, dim, *_slice_bounds(item))
            dim += 1
        elif isinstance(item, torch.Tensor) and item.dim() == 0 and _is_integer(item):
            view = aten.select.int(view, dim, item.item())
        elif isinstance(item, torch.Tensor):
            found = _index_tensors(item)
            indices += [None] * (dim - len(indices)) + found
            dim += len(found)
        elif isinstance(item, bool) or not hasattr(type(item), "__index__"):
            raise NotImplementedError(
                f"fake CUDA indexing does not translate {item!r} in {index!r}"
            )
        else:
            view = aten.select.int(view, dim, operator.index(item))
    return view, (indices or None)


def _expand_ellipsis(index: object, ndim: int) -> tuple:
    items = index if isinstance(index, tuple) else (index,)
    at = [i for i, item in enumerate(items) if item is Ellipsis]
    if len(at) > 1:
        raise IndexError("an index can only have a single ellipsis ('...')")
    if not at:
        return items
    used = sum(_dims_used(item) for item in items)
    return items[: at[0]] + (slice(None),) * (ndim - used) + items[at[0] + 1 :]


def _dims_used(item: object) -> int:
    if item is None or item is Ellipsis:
        return 0
    if isinstance(item, torch.Tensor) and item.dtype in (torch.bool, torch.uint8):
        return item.dim()
    return 1


def _index_tensors(item: torch.Tensor) -> list[torch.Tensor]:
    """One index per dim the item covers: itself, or a mask's nonzero coordinates."""
    if item.dtype in (torch.bool, torch.uint8):
        return list(aten.nonzero.default(item).unbind(1))
    return [item]


def _slice_bounds(item: slice) -> tuple[int, int, int]:
    start = 0 if item.start is None else _as_index(item.start)
    stop = sys.maxsize if item.stop is None else _as_index(item.stop)
    step = 1 if item.step is None else _as_index(item.step)
    return start, stop, step


def _as_index(bound: object) -> int:
    """A slice bound; a tensor one is read with `.item()` (a host sync, as in torch)."""
    return bound.item() if isinstance(bound, torch.Tensor) else operator.index(bound)


def _is_integer(tensor: torch.Tensor) -> bool:
    dtype = tensor.dtype
    return not (dtype.is_floating_point or dtype.is_complex or dtype in (torch.bool, torch.uint8))


def _is_host_scalar(value: object) -> bool:
    """A Python number or a 0-dim CPU tensor: torch's setitem fills with it (no copy)."""
    if not isinstance(value, torch.Tensor):
        return True
    return value.dim() == 0 and value.device.type == "cpu"


def _strip_leading_ones(value: torch.Tensor) -> torch.Tensor:
    """The value without its leading size-1 dims, as torch's setitem assigns it."""
    shape = list(value.shape)
    while shape and shape[0] == 1:
        shape.pop(0)
    return value if len(shape) == value.dim() else aten.view.default(value, shape)


_REWRITES = {
    torch.Tensor.__getitem__: _getitem,
    torch.Tensor.__setitem__: _setitem,
    torch.Tensor.copy_: _copy,
    torch.Tensor.contiguous: _contiguous,
    torch.Tensor.to: _to,
    torch.Tensor.__invert__: aten.bitwise_not.default,
}
