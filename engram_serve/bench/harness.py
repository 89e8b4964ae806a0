"""What every benchmark does alike, so that each bench file holds only its own protocol:

machine()          where a result came from: CPU model and features, cores, threads, GPU, load
alternating()      runs in A B B A order over rounds
progress(), say()  a progress bar on stderr, and lines printed above it
save()             the report as JSON (to read) and, given a plot, as PNG (to look at)
figure()           a matplotlib figure that is saved and closed on exit (bar_panels: bars)
drop_page_cache()  files out of the OS page cache between runs
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

# The CPU features the kernels and torch's matmuls choose their code by (read per run: the
# machines differ between runs).
CPU_FEATURES = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")


def machine() -> dict[str, Any]:
    """Where a result came from: the CPU's model and features, cores, torch's threads and version,
    the GPU if any, the date, and the 1-minute load average (a shared machine's numbers swing
    with it; `save` adds the load at the end)."""
    import torch  # here: the HTTP benchmarks measure other servers and need no torch

    model, flags = None, set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model is None:
                    model = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:  # not Linux
        pass
    out = {
        "cpu": model or platform.processor() or platform.machine(),
        "cpu_features": [f for f in CPU_FEATURES if f in flags],
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "load_average": load_average(),
    }
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name()
    return out


def load_average() -> float:
    return os.getloadavg()[0]


def alternating(items: Sequence[T], rounds: int) -> Iterator[tuple[int, T]]:
    """(round, item) for `rounds` rounds, the items in order and then reversed (A B B A): a drift
    of the machine's speed over the rounds, or an effect of one run on the next, favours none."""
    for round_ in range(rounds):
        for item in items if round_ % 2 == 0 else items[::-1]:
            yield round_, item


def progress(iterable: Iterable[T], desc: str, total: int | None = None) -> Iterable[T]:
    """`iterable` with a progress bar on stderr (the report goes to stdout)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, file=sys.stderr, leave=False)


def say(line: str) -> None:
    """Print a line to stdout above any progress bar."""
    from tqdm.auto import tqdm

    tqdm.write(line, file=sys.stdout)
    sys.stdout.flush()


def save(
    report: dict[str, Any],
    out: str | Path,
    plot: Callable[[Path], None] | None = None,
    **json_options: Any,
) -> None:
    """Write `report` to `out` as .json and, given `plot(path)`, a .png beside it; print both
    paths. A report with a "machine" entry (from `machine()` at the start) gets the load average
    at the end beside the one at the start."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if "machine" in report:
        report["machine"]["load_average_end"] = load_average()
    path = out.with_suffix(".json")
    path.write_text(json.dumps(report, indent=2, **json_options) + "\n")
    say(f"wrote {path}")
    if plot is not None:
        plot(out.with_suffix(".png"))
        say(f"wrote {out.with_suffix('.png')}")


@contextmanager
def figure(path: Path, ncols: int, size: tuple[float, float], dpi: int = 110) -> Iterator[Any]:
    """`with figure(path, 3, (16, 4.5)) as (fig, axes):` draws one row of `ncols` panels, then
    lays them out, saves the PNG and frees the figure."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a server
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=size)
    try:
        yield fig, axes
        fig.tight_layout()
        fig.savefig(path, dpi=dpi)
    finally:
        plt.close(fig)


def bar_panels(axes: Sequence[Any], names: list[str], panels: Sequence[tuple[str, list]]) -> None:
    """One bar chart per (title, values) panel, a bar per name."""
    for ax, (title, values) in zip(axes, panels, strict=False):
        ax.bar(range(len(names)), values, color="tab:blue")
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(title)


def drop_page_cache(paths: Iterable[str | Path]) -> None:
    """Evict these files from the OS page cache: no run reads pages another run left there."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
