"""The fake CUDA runtime (tests/fake_cuda.py): every rule raises on a violation and stays quiet,
with the right counts, on correct use; its indexing means what torch's indexing means."""

from __future__ import annotations

import inspect
import threading

import numpy as np
import pytest
import torch
from fake_cuda import AtenMethods, FakeCudaRuntime, FakeGenerator, OrderingError
from torch._subclasses.fake_tensor import (
    DataDependentOutputException,
    DynamicOutputShapeException,
    FakeTensor,
)

from engram_serve import device as dev

pytestmark = pytest.mark.fake_cuda


@pytest.fixture
def rt() -> FakeCudaRuntime:
    return FakeCudaRuntime()


def registered(rt: FakeCudaRuntime, shape=(4, 8), dtype=np.float32) -> np.ndarray:
    array = np.zeros(shape, dtype)
    rt.register_host(array.ctypes.data, array.nbytes, dev.HOST_REGISTER_PORTABLE)
    return array


def side_write(rt: FakeCudaRuntime, side) -> torch.Tensor:
    """A tensor written on stream `side`: its allocation and its copy from registered memory
    are enqueued there, and no sync covers them."""
    with rt.stream(side):
        return rt.upload(registered(rt), non_blocking=True)


def device_index(*shape: int) -> torch.Tensor:
    return torch.zeros(shape, dtype=torch.long, device="cuda")


# -- interface ---------------------------------------------------------------------------------


def public_methods(cls: type) -> dict[str, inspect.Signature]:
    return {
        name: inspect.signature(getattr(cls, name))
        for name in dir(cls)
        if not name.startswith("_") and inspect.isfunction(getattr(cls, name))
    }


def test_has_the_public_methods_and_signatures_of_the_cuda_runtime():
    real, fake = public_methods(dev.CudaRuntime), public_methods(FakeCudaRuntime)
    assert set(real) <= set(fake)
    for name, signature in real.items():
        got = [(p.name, p.kind, p.default) for p in fake[name].parameters.values()]
        assert got == [(p.name, p.kind, p.default) for p in signature.parameters.values()], name
    runtime = FakeCudaRuntime()
    assert runtime.is_cuda is True and runtime.device == torch.device("cuda", 0)


# -- the modes ---------------------------------------------------------------------------------


def test_active_is_reentrant_and_leaves_no_mode_behind(rt):
    with rt.active():
        with rt.active():
            inner = torch.empty(2, 3, device="cuda")
        assert isinstance(inner + 1, FakeTensor)
        assert inner[0].shape == (3,)
    with pytest.raises(AssertionError, match="not compiled with CUDA"):
        torch.empty(2, device="cuda")


def test_active_flags_host_syncs_and_real_tensors(rt):
    real = torch.ones(2)
    with rt.active():
        x = torch.zeros(2, device="cuda")
        with pytest.raises(DataDependentOutputException):
            x.sum().item()
        with pytest.raises(AssertionError, match="convert all Tensors to FakeTensors"):
            x + real


def test_methods_work_outside_active_and_from_other_threads(rt):
    side = rt.new_stream()
    made = {}

    def worker():
        made["stream"] = rt.current_stream()
        made["tensor"] = rt.upload(np.zeros((2, 3), np.float32))

    with rt.stream(side):
        thread = threading.Thread(target=worker)
        thread.start()
        thread.join()
    assert made["stream"] is rt.default_stream  # the current stream is per thread
    assert isinstance(made["tensor"], FakeTensor) and made["tensor"].device.type == "cuda"
    with rt.active():
        assert (made["tensor"] * 2).shape == (2, 3)


def test_views_of_fake_tensors_share_the_storage_object(rt):
    with rt.active():
        x = torch.empty(4, 8, device="cuda")
        assert x[1:3].untyped_storage() is x.untyped_storage()
        assert x.view(torch.int32)[0].untyped_storage() is x.untyped_storage()
        assert torch.empty(4, device="cuda").untyped_storage() is not x.untyped_storage()


# -- indexing ----------------------------------------------------------------------------------

GETITEMS = {
    "t[:, None, :]": lambda t, i, j: t[:, None, :],
    "t[:, 0, :]": lambda t, i, j: t[:, 0, :],
    "t[:, :3]": lambda t, i, j: t[:, :3],
    "t[..., 0]": lambda t, i, j: t[..., 0],
    "t[None, ..., 1]": lambda t, i, j: t[None, ..., 1],
    "t[...]": lambda t, i, j: t[...],
    "t[1:3]": lambda t, i, j: t[1:3],
    "t[1]": lambda t, i, j: t[1],
    "t[-1]": lambda t, i, j: t[-1],
    "t[::2]": lambda t, i, j: t[::2],
    "t[1:-1:2, -2:]": lambda t, i, j: t[1:-1:2, -2:],
    "t[np.int64(2)]": lambda t, i, j: t[np.int64(2)],
    "t[i]": lambda t, i, j: t[i],
    "t[i, j]": lambda t, i, j: t[i, j],
    "t[:, i]": lambda t, i, j: t[:, i],
    "t[0, i]": lambda t, i, j: t[0, i],
    "t[i, None]": lambda t, i, j: t[i, None],
    "t[i, :, j]": lambda t, i, j: t[i, :, j],
    "t[i[:, None], j]": lambda t, i, j: t[i[:, None], j],
}


def full(t: torch.Tensor, shape: tuple[int, ...], value: float) -> torch.Tensor:
    return torch.full(shape, value, device=t.device)


SETITEMS = {
    "t[i] = v": lambda t, i, j: t.__setitem__(i, full(t, (3, 5, 6), 1.0)),
    "t[i] = 0.0": lambda t, i, j: t.__setitem__(i, 0.0),
    "t[1:3] = 0": lambda t, i, j: t.__setitem__(slice(1, 3), 0),
    "t[1, i] = x": lambda t, i, j: t.__setitem__((1, i), full(t, (3, 6), 2.0)),
    "t[:, 0] = y": lambda t, i, j: t.__setitem__((slice(None), 0), full(t, (4, 6), 3.0)),
    "t[0] = w[None]": lambda t, i, j: t.__setitem__(0, full(t, (1, 5, 6), 4.0)),
    "t[..., 0] = 7": lambda t, i, j: t.__setitem__((Ellipsis, 0), 7),
    "t[i, j] = cpu 0-dim": lambda t, i, j: t.__setitem__((i, j), torch.tensor(5.0)),
    "t[1:3] = cpu 0-dim": lambda t, i, j: t.__setitem__(slice(1, 3), torch.tensor(6.0)),
}


def cpu_operands():
    base = torch.arange(4 * 5 * 6, dtype=torch.float32).reshape(4, 5, 6)
    return base, torch.tensor([2, 0, 3]), torch.tensor([1, 4, 0])


@pytest.mark.parametrize("name", GETITEMS)
def test_aten_indexing_reads_what_torch_indexing_reads(name):
    t, i, j = cpu_operands()
    with AtenMethods():
        got = GETITEMS[name](t, i, j)
    assert torch.equal(got, GETITEMS[name](t, i, j))


@pytest.mark.parametrize("name", SETITEMS)
def test_aten_indexing_writes_what_torch_indexing_writes(name):
    base, i, j = cpu_operands()
    got, want = base.clone(), base.clone()
    with AtenMethods():
        SETITEMS[name](got, i, j)
    SETITEMS[name](want, i, j)
    assert not torch.equal(want, base)
    assert torch.equal(got, want)


def test_aten_indexing_keeps_mask_and_tensor_index_semantics_on_real_tensors():
    t, i, _ = cpu_operands()
    mask = torch.tensor([True, False, True, False])
    with AtenMethods():
        assert torch.equal(t[mask], t.clone()[mask.nonzero().squeeze(1)])
        assert torch.equal(t[torch.tensor(2)], t[2].clone())
        assert torch.equal(t[: torch.tensor(2)], t[:2].clone())
        assert t[...] is not t and t[()] is not t  # a new alias, as torch gives


@pytest.mark.parametrize("name", GETITEMS)
def test_fake_cuda_indexing_gives_torch_shapes(rt, name):
    t, i, j = cpu_operands()
    want = GETITEMS[name](t, i, j).shape
    with rt.active():
        got = GETITEMS[name](torch.empty(4, 5, 6, device="cuda"), device_index(3), device_index(3))
    assert got.shape == want and got.device.type == "cuda"


@pytest.mark.parametrize("name", SETITEMS)
def test_fake_cuda_setitem_writes_on_the_current_stream(rt, name):
    side = rt.new_stream()
    with rt.active():
        t, i, j = torch.empty(4, 5, 6, device="cuda"), device_index(3), device_index(3)
        rt.wait_stream(side, rt.default_stream)
        with rt.stream(side):
            SETITEMS[name](t, i, j)
        with pytest.raises(OrderingError, match="read on stream default before the event"):
            t.sum()


def test_unsupported_indices_raise_naming_the_index(rt):
    with rt.active():
        t = torch.empty(4, 5, device="cuda")
        with pytest.raises(NotImplementedError, match=r"\[0, 1\]"):
            t[[0, 1]]
        with pytest.raises(NotImplementedError, match="True"):
            t[True]
        with pytest.raises(IndexError, match="single ellipsis"):
            t[..., ...]


def test_fake_cuda_indexing_flags_host_syncs(rt):
    with rt.active():
        t = torch.empty(4, 5, device="cuda")
        with pytest.raises(DynamicOutputShapeException):
            t[torch.zeros(4, dtype=torch.bool, device="cuda")]
        with pytest.raises(DataDependentOutputException):
            t[device_index()]
        with pytest.raises(DataDependentOutputException):
            t[: device_index()]


# -- uploads -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("array", "dtype"),
    [
        (np.zeros((2, 3), np.float32), torch.float32),
        (np.zeros(5, np.int64), torch.int64),
        (np.zeros((3, 4), np.uint16), torch.uint16),  # bfloat16 bits, as torch.from_numpy
        (torch.zeros(2, 2, dtype=torch.bfloat16), torch.bfloat16),
    ],
)
def test_upload_keeps_shape_and_dtype(rt, array, dtype):
    tensor = rt.upload(array)
    assert (tensor.shape, tensor.dtype, tensor.device) == (array.shape, dtype, rt.device)
    assert (rt.uploads, rt.upload_bytes) == (1, array.nbytes)


def test_upload_of_a_device_tensor_is_refused(rt):
    with pytest.raises(ValueError, match="uploads are of host memory"):
        rt.upload(rt.upload(np.zeros(2, np.float32)))


def test_blocking_upload_waits_for_its_stream(rt):
    rt.upload(np.zeros(4, np.float32))
    assert rt.sync_kinds == {"blocking_upload": 1}
    rt.assert_idle()


@pytest.mark.parametrize(
    "source",
    [np.zeros(4, np.float32), np.zeros((4, 2), np.float32)[:, 0], torch.zeros(4)],
    ids=["numpy", "strided numpy", "cpu tensor"],
)
def test_non_blocking_upload_from_pageable_memory_is_a_sync(rt, source):
    rt.upload(source, non_blocking=True)
    assert (rt.syncs, rt.sync_kinds) == (1, {"pageable_copy": 1})


def test_a_pageable_copy_waits_for_earlier_work_but_not_for_itself(rt):
    earlier = rt.new_event()
    earlier.record()
    rt.upload(np.zeros(4, np.float32), non_blocking=True)
    assert earlier.query()
    with pytest.raises(AssertionError, match="work in flight"):
        rt.assert_idle()


def test_non_blocking_upload_from_a_fake_cpu_tensor_is_a_pageable_copy(rt):
    with rt.active():
        rt.upload(torch.zeros(4), non_blocking=True)
    assert rt.sync_kinds == {"pageable_copy": 1}


def test_non_blocking_upload_from_registered_memory_is_in_flight_until_a_sync(rt):
    staging = registered(rt)
    rt.upload(staging, non_blocking=True)
    assert rt.syncs == 0
    with pytest.raises(AssertionError, match="work in flight"):
        rt.assert_idle()
    event = rt.new_event()
    event.record()
    assert not event.query()
    event.synchronize()
    staging[:] = 1  # the copy is complete: refilling is safe
    assert event.query() and rt.sync_kinds == {"event_sync": 1}
    rt.assert_idle()


def test_staging_rewritten_while_its_copy_is_in_flight_raises(rt):
    staging = registered(rt)
    rt.upload(staging[1], non_blocking=True)
    staging[1, 3] = 1
    with pytest.raises(OrderingError, match="host buffer rewritten while its copy was in flight"):
        rt.synchronize()


def test_staging_rewritten_outside_the_copied_bytes_is_fine(rt):
    staging = registered(rt)
    rt.upload(staging[1], non_blocking=True)
    staging[2] = 1
    rt.synchronize()
    rt.assert_idle()


def test_a_sync_that_does_not_cover_the_copy_does_not_complete_it(rt):
    staging = registered(rt)
    side = rt.new_stream()
    with rt.stream(side):
        rt.upload(staging, non_blocking=True)
    rt.download(rt.upload(np.zeros(2, np.float32)))  # syncs the default stream only
    staging[0, 0] = 1
    assert rt.sync_kinds["download"] == 1
    with pytest.raises(OrderingError, match="host buffer rewritten"):
        rt.synchronize()


def test_a_download_after_waiting_on_the_copy_completes_it(rt):
    staging = registered(rt)
    side = rt.new_stream()
    with rt.stream(side):
        rows = rt.upload(staging, non_blocking=True)
        copied = rt.new_event()
        copied.record()
    rt.wait_event(rt.default_stream, copied)
    rt.download(rows)
    assert copied.query()
    staging[:] = 1
    rt.synchronize()


def test_upload_into_checks_its_destination(rt):
    with rt.active():
        dst = torch.empty(4, 8, device="cuda")
        with pytest.raises(ValueError, match=r"\(4, 8\) torch.float32 from \(4, 4\)"):
            rt.upload_into(dst, np.zeros((4, 4), np.float32))
        with pytest.raises(ValueError, match="torch.int64"):
            rt.upload_into(dst, np.zeros((4, 8), np.int64))
        with pytest.raises(ValueError, match="the destination is on the device"):
            rt.upload_into(torch.empty(4, 8), np.zeros((4, 8), np.float32))
        rt.upload_into(dst, registered(rt), non_blocking=True)
    assert (rt.uploads, rt.upload_bytes, rt.syncs) == (1, 4 * 8 * 4, 0)


def test_upload_into_is_a_write_on_the_current_stream(rt):
    side = rt.new_stream()
    dst = rt.upload(np.zeros((4, 8), np.float32))
    rt.wait_stream(side, rt.default_stream)
    with rt.stream(side):
        rt.upload_into(dst, registered(rt), non_blocking=True)
    with rt.active(), pytest.raises(OrderingError, match="read on stream default"):
        dst + 1


def test_upload_into_a_tensor_still_written_on_another_stream_raises(rt):
    side = rt.new_stream()
    dst = side_write(rt, side)
    with pytest.raises(OrderingError, match="upload_into: a tensor is read on stream default"):
        rt.upload_into(dst, registered(rt), non_blocking=True)


# -- downloads ---------------------------------------------------------------------------------


def test_download_is_a_sync_returning_zeros_of_the_shape_and_dtype(rt):
    with rt.active():
        ids = torch.zeros(3, 2, dtype=torch.int64, device="cuda")
    got = rt.download(ids)
    assert (got.shape, got.dtype, got.any()) == ((3, 2), np.int64, False)
    assert (rt.downloads, rt.syncs, rt.sync_kinds) == (1, 1, {"download": 1})
    rt.assert_idle()


def test_download_contents_come_from_fill(rt):
    runtime = FakeCudaRuntime(fill=lambda t: np.arange(t.numel()).reshape(t.shape))
    got = runtime.download(runtime.upload(np.zeros((2, 3), np.float32)))
    assert got.dtype == np.float32 and got.tolist() == [[0, 1, 2], [3, 4, 5]]
    wrong = FakeCudaRuntime(fill=lambda t: np.zeros(1))
    with pytest.raises(ValueError, match=r"fill gave \(1,\) for a \(2, 3\) tensor"):
        wrong.download(wrong.upload(np.zeros((2, 3), np.float32)))


def test_download_of_bfloat16_fails_as_numpy_does(rt):
    with pytest.raises(TypeError, match="BFloat16"):
        rt.download(rt.upload(torch.zeros(2, dtype=torch.bfloat16)))


def test_download_of_a_side_stream_write_before_its_event_raises(rt):
    side = rt.new_stream()
    rows = side_write(rt, side)
    with pytest.raises(OrderingError, match="download: a tensor is read on stream default"):
        rt.download(rows)
    rt.wait_stream(rt.default_stream, side)
    assert rt.download(rows).shape == (4, 8)


def test_download_of_a_host_tensor_is_refused(rt):
    with pytest.raises(ValueError, match="downloads are of the device"):
        rt.download(torch.zeros(2))


def test_download_completes_what_its_stream_waited_on_and_nothing_else(rt):
    side, other = rt.new_stream(), rt.new_stream()
    with rt.stream(side):
        waited = rt.new_event()
        waited.record()
    with rt.stream(other):
        unrelated = rt.new_event()
        unrelated.record()
    rt.wait_event(rt.default_stream, waited)
    rt.download(rt.upload(np.zeros(2, np.float32)))
    assert waited.query() and not unrelated.query()
    with pytest.raises(AssertionError, match="stream2"):
        rt.assert_idle()


def test_a_device_to_host_copy_behind_the_runtime_is_counted(rt):
    with rt.active():
        x = torch.zeros(3, device="cuda")
        x.cpu()
        x.to("cpu", torch.float16)
        torch.empty(3).copy_(x)
        x.sum()  # device -> device: not counted
    assert (rt.syncs, rt.sync_kinds) == (3, {"device_to_host": 3})
    assert rt.downloads == 0


def test_a_host_to_device_copy_behind_the_runtime_is_counted(rt):
    with rt.active():
        x = torch.zeros(3, device="cuda")
        host = torch.zeros(3)
        x.copy_(host)
        host.to(rt.device)
        torch.tensor([1, 2], device="cuda")
        x[torch.zeros(2, dtype=torch.long)]  # torch copies host indices to the device
        x.fill_(torch.tensor(1.0))  # a 0-dim host tensor is a scalar argument: not counted
        x + torch.tensor(2.0)
    assert (rt.syncs, rt.sync_kinds) == (4, {"host_to_device": 4})
    assert rt.uploads == 0


def test_copy_contiguous_and_to_work_on_fake_device_tensors(rt):
    with rt.active():
        x, y = torch.zeros(4, 6, device="cuda"), torch.ones(6, device="cuda")
        assert x.copy_(y) is x
        assert x.contiguous() is x
        transposed = x.t().contiguous()
        assert transposed.is_contiguous() and transposed.shape == (6, 4)
        assert x.to(rt.device) is x and x.to("cuda", torch.float32) is x
        half = x.to("cuda", torch.float16)
        assert (half.dtype, half.device) == (torch.float16, rt.device)
        assert x.to(half).dtype == torch.float16
        assert x.to(torch.float32, copy=True) is not x
    assert rt.syncs == 0


def test_method_rewrites_mean_what_torch_methods_mean():
    base = torch.arange(24.0).reshape(4, 6)
    with AtenMethods():
        copied = torch.zeros(4, 6).copy_(base[0])
        transposed = base.t().contiguous()
        half = base.to("cpu", torch.float16)
        same = base.to(torch.float32)
    assert torch.equal(copied, torch.zeros(4, 6).copy_(base[0]))
    assert torch.equal(transposed, base.t()) and transposed.is_contiguous()
    assert torch.equal(half, base.half()) and same is base


# -- streams and events ------------------------------------------------------------------------


def test_stream_sets_and_restores_the_current_stream(rt):
    side = rt.new_stream()
    assert rt.current_stream() is rt.default_stream
    with rt.stream(side):
        assert rt.current_stream() is side
        with rt.stream(None):
            assert rt.current_stream() is side
    assert rt.current_stream() is rt.default_stream


def test_foreign_streams_are_refused(rt):
    foreign = FakeCudaRuntime().new_stream()
    with pytest.raises(TypeError, match="not a stream of this fake runtime"):
        rt.stream(foreign).__enter__()
    with pytest.raises(TypeError, match="not a stream"):
        rt.wait_stream(rt.default_stream, foreign)


def test_event_query_is_true_only_once_a_sync_covers_it(rt):
    never_recorded = rt.new_event()
    assert never_recorded.query()
    event = rt.new_event()
    event.record()
    assert not event.query()
    rt.synchronize()
    assert event.query() and rt.sync_kinds == {"device_sync": 1}


def test_event_synchronize_completes_only_its_stream(rt):
    side = rt.new_stream()
    side_write(rt, side)
    first = rt.new_event()
    first.record()
    with rt.stream(side):
        later = rt.new_event()
        later.record()
    first.synchronize()
    assert first.query() and not later.query()
    assert rt.sync_kinds == {"event_sync": 1}


def test_elapsed_time_needs_timing_recording_and_completion(rt):
    start, end = rt.new_event(timing=True), rt.new_event(timing=True)
    with pytest.raises(RuntimeError, match="must be recorded"):
        start.elapsed_time(end)
    start.record()
    end.record()
    with pytest.raises(RuntimeError, match="must be completed"):
        start.elapsed_time(end)
    with pytest.raises(RuntimeError, match="enable_timing=True"):
        start.elapsed_time(rt.new_event())
    end.synchronize()
    assert start.elapsed_time(end) == 0.0


def test_synchronize_completes_every_stream(rt):
    side = rt.new_stream()
    with rt.stream(side):
        rt.upload(registered(rt), non_blocking=True)
    rt.upload(registered(rt), non_blocking=True)
    with pytest.raises(AssertionError, match="default.*stream1"):
        rt.assert_idle()
    rt.synchronize()
    rt.assert_idle()


# -- generators --------------------------------------------------------------------------------


def test_exponential_draws_one_row_per_generator(rt):
    generators = [rt.generator(seed) for seed in (1, 2, 3)]
    noise = rt.exponential(7, generators)
    assert (noise.shape, noise.dtype, noise.device) == ((3, 7), torch.float32, rt.device)
    assert isinstance(generators[0], FakeGenerator) and generators[1].initial_seed() == 2
    assert generators[0].device == rt.device


@pytest.mark.parametrize(
    "foreign", [torch.Generator(), FakeCudaRuntime().generator(0)], ids=["cpu", "other runtime"]
)
def test_exponential_refuses_generators_of_other_devices(rt, foreign):
    with pytest.raises(ValueError, match="is not a generator of this cuda:0 runtime"):
        rt.exponential(4, [rt.generator(0), foreign])


def test_exponential_is_written_on_the_current_stream(rt):
    side = rt.new_stream()
    with rt.stream(side):
        noise = rt.exponential(4, [rt.generator(0)])
    with rt.active(), pytest.raises(OrderingError, match="before the event of stream stream1"):
        noise.argmax(-1)


# -- stream ordering of tensors ----------------------------------------------------------------


def test_reading_a_side_stream_write_before_its_event_raises(rt):
    rows = side_write(rt, rt.new_stream())
    with (
        rt.active(),
        pytest.raises(OrderingError, match="read on stream default before the event of stream"),
    ):
        rows @ torch.empty(8, 2, device="cuda")


def test_reading_after_the_event_is_ordered(rt):
    side = rt.new_stream()
    rows = side_write(rt, side)
    with rt.stream(side):
        ready = rt.new_event()
        ready.record()
    rt.wait_event(rt.default_stream, ready)
    with rt.active():
        assert (rows @ torch.empty(8, 2, device="cuda")).shape == (4, 2)
    assert rt.syncs == 0


def test_an_event_recorded_before_the_write_does_not_order_it(rt):
    side = rt.new_stream()
    early = rt.new_event()
    early.record(side)
    rows = side_write(rt, side)
    rt.wait_event(rt.default_stream, early)
    with rt.active(), pytest.raises(OrderingError, match="write at 3, seen to 1"):
        rows.sum()


def test_wait_stream_orders_everything_enqueued_so_far(rt):
    side = rt.new_stream()
    rows = side_write(rt, side)
    rt.wait_stream(rt.default_stream, side)
    with rt.active():
        rows.sum()


def test_a_host_sync_of_the_writer_orders_the_read(rt):
    side = rt.new_stream()
    rows = side_write(rt, side)
    with rt.stream(side):
        done = rt.new_event()
        done.record()
    done.synchronize()
    with rt.active():
        rows.sum()


def test_views_are_free_but_reading_them_is_checked(rt):
    side = rt.new_stream()
    rows = side_write(rt, side)
    with rt.active():
        head = rows[1:3]  # no kernel: not a read
        with pytest.raises(OrderingError, match="read on stream default"):
            head.sum()
        rt.wait_stream(rt.default_stream, side)
        head.sum()


def test_in_place_ops_retag_their_output(rt):
    side = rt.new_stream()
    with rt.active():
        x = torch.zeros(4, device="cuda")
        x.add_(1)
        rt.wait_stream(side, rt.default_stream)
        with rt.stream(side):
            x.sum()
        x.mul_(2)  # written on default after side's wait
        with rt.stream(side), pytest.raises(OrderingError, match="read on stream stream1"):
            x.sum()


def test_same_stream_reads_need_no_event(rt):
    side = rt.new_stream()
    with rt.stream(side), rt.active():
        rows = rt.upload(np.zeros((4, 8), np.float32))
        (rows * 2).sum()


def test_record_stream_is_counted_and_needs_a_device_tensor(rt):
    side = rt.new_stream()
    rt.record_stream(rt.upload(np.zeros(2, np.float32)), side)
    assert rt.record_streams == 1
    with pytest.raises(ValueError, match="record_stream of a cpu tensor"):
        rt.record_stream(torch.zeros(2), side)
    with pytest.raises(TypeError, match="not a stream"):
        rt.record_stream(rt.upload(np.zeros(2, np.float32)), object())


# -- host registration -------------------------------------------------------------------------


def test_device_attributes(rt):
    assert rt.device_attribute(dev.ATTR_CAN_USE_HOST_POINTER_FOR_REGISTERED_MEM) == 1
    assert rt.device_attribute(dev.ATTR_HOST_REGISTER_READ_ONLY_SUPPORTED) == 1
    assert FakeCudaRuntime(attributes={91: 0}).device_attribute(91) == 0
    with pytest.raises(dev.CudaError, match="cudaDeviceGetAttribute") as error:
        rt.device_attribute(5)
    assert error.value.code == 1


def test_read_only_registration_needs_the_attribute():
    array = np.zeros(16, np.uint8)
    flags = dev.HOST_REGISTER_READ_ONLY | dev.HOST_REGISTER_PORTABLE
    without = FakeCudaRuntime(attributes={91: 1, 113: 0})
    with pytest.raises(dev.CudaError, match="flags 0x9") as error:
        without.register_host(array.ctypes.data, array.nbytes, flags)
    assert error.value.code == 801
    without.register_host(array.ctypes.data, array.nbytes, dev.HOST_REGISTER_PORTABLE)
    FakeCudaRuntime().register_host(array.ctypes.data, array.nbytes, flags)


def test_overlapping_registration_is_refused(rt):
    array = np.zeros(64, np.uint8)
    base = array.ctypes.data
    rt.register_host(base, 32, 0)
    rt.register_host(base + 32, 32, 0)  # adjacent: fine
    with pytest.raises(dev.CudaError) as error:
        rt.register_host(base + 16, 8, 0)
    assert error.value.code == 712


def test_unregister_needs_the_start_of_a_registration(rt):
    array = registered(rt)
    with pytest.raises(dev.CudaError, match="cudaHostUnregister") as error:
        rt.unregister_host(array.ctypes.data + 4)
    assert error.value.code == 713
    rt.unregister_host(array.ctypes.data)
    with pytest.raises(dev.CudaError):
        rt.unregister_host(array.ctypes.data)


def test_unregister_with_work_in_flight_raises(rt):
    staging = registered(rt)
    rt.upload(staging, non_blocking=True)
    with pytest.raises(OrderingError, match="unregistered with work in flight"):
        rt.unregister_host(staging.ctypes.data)
    rt.synchronize()
    rt.unregister_host(staging.ctypes.data)


def test_host_view_needs_registered_memory(rt):
    table = registered(rt, (16, 4))
    with pytest.raises(dev.CudaError, match="outside registered memory") as error:
        rt.host_view(np.zeros((16, 4), np.float32))
    assert error.value.code == 1
    straddling = np.zeros(32, np.float32)
    rt.register_host(straddling.ctypes.data, 16 * 4, 0)
    with pytest.raises(dev.CudaError, match="outside registered memory"):
        rt.host_view(straddling[8:24])
    assert rt.host_view(table[2:5]).shape == (3, 4)


def test_host_view_needs_host_pointers_usable_on_the_device():
    runtime = FakeCudaRuntime(attributes={91: 0, 113: 1})
    with pytest.raises(dev.CudaError) as error:
        runtime.host_view(registered(runtime))
    assert error.value.code == 801


def test_host_view_refuses_a_strided_array(rt):
    with pytest.raises(ValueError, match="C order"):
        rt.host_view(registered(rt)[:, ::2])


def test_host_view_points_at_the_host_array(rt):
    table = registered(rt, (16, 4), np.uint16)
    view = rt.host_view(table)
    assert (view.shape, view.dtype, view.device) == ((16, 4), torch.int16, rt.device)
    assert rt.view_points_at_host(view, table)
    assert not rt.view_points_at_host(view, table[1:])
    assert not rt.view_points_at_host(rt.upload(table), table)
    with rt.active():
        assert rt.view_points_at_host(view[3:], table[3:])
        assert rt.view_points_at_host(view.view(torch.bfloat16)[5], table[5])


# -- counters ----------------------------------------------------------------------------------


def counts(rt: FakeCudaRuntime) -> dict[str, object]:
    names = ("syncs", "sync_kinds", "uploads", "upload_bytes", "downloads", "record_streams")
    return {name: getattr(rt, name) for name in names}


def test_reset_counts(rt):
    side = rt.new_stream()
    tensor = rt.upload(np.zeros(4, np.float32), non_blocking=True)
    rt.record_stream(tensor, side)
    rt.download(tensor)
    assert counts(rt) == {
        "syncs": 2,
        "sync_kinds": {"pageable_copy": 1, "download": 1},
        "uploads": 1,
        "upload_bytes": 16,
        "downloads": 1,
        "record_streams": 1,
    }
    rt.reset_counts()
    assert counts(rt) == dict.fromkeys(counts(rt), 0) | {"sync_kinds": {}}
