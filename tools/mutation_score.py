"""The mutation score per module from mutmut's results (mutants/**/*.py.meta), for `make mutation`.

score = (killed + timeout) / (mutants with tests); "no tests" (no selected test runs the
function) is counted apart. A row for `SamplingRequest.sampling_params` (the HTTP -> SamplingParams
mapping) follows protocol.py's. `--survivors FILE` writes the surviving mutants' names to FILE.

`--recheck` runs each survivor and timeout again, against the whole of its module's test files
(RECHECK_TESTS), and records that verdict. mutmut runs a mutant only against the tests that
called its function while it collected stats, and a call made inside a module-scoped fixture
counts for the first test that used the fixture alone: test_sampler.py's distribution cases
share one batch drawn by such a fixture, so mutmut runs a sampler mutant against the first case
only, and a mutant that only a later case (a penalty's) kills comes out a survivor.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

from mutmut.stats import status_by_exit_code

MAPPING = "xǁSamplingRequestǁsampling_params__mutmut_"
RECHECK_TESTS = {  # mutated module -> the test files that --recheck runs a survivor against
    "engram_serve/engine/sampler.py": ["tests/test_sampler.py", "tests/test_engine_fake_cuda.py"],
    "engram_serve/engine/output.py": ["tests/test_output.py"],
    "engram_serve/engine/scheduler.py": ["tests/test_scheduler.py"],
    "engram_serve/server/protocol.py": ["tests/test_server.py", "tests/test_server_sampling.py"],
}
RECHECK_TIMEOUT_S = 600
TIMEOUT = 36  # mutmut's exit code for a timeout


def recheck(meta: Path, module: str) -> None:
    """Run each survivor and timeout of one module against its whole test files (in mutants/,
    with mutmut's MUTANT_UNDER_TEST) and store the verdict in the module's .meta file."""
    data = json.loads(meta.read_text())
    codes = data["exit_code_by_key"]
    again = [k for k, code in codes.items() if status_by_exit_code[code] in ("survived", "timeout")]
    for i, name in enumerate(again, 1):
        # Only a mutated module's own tests: protocol.py's other mutants are out of scope.
        if module.endswith("protocol.py") and MAPPING not in name:
            continue
        command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                   *RECHECK_TESTS[module]]  # fmt: skip
        try:
            result = subprocess.run(
                command, cwd=meta.parents[len(Path(module).parts) - 1],
                env={**os.environ, "MUTANT_UNDER_TEST": name}, capture_output=True,
                timeout=RECHECK_TIMEOUT_S,
            )  # fmt: skip
            codes[name] = result.returncode
        except subprocess.TimeoutExpired:
            codes[name] = TIMEOUT
        print(f"recheck {i}/{len(again)} {status_by_exit_code[codes[name]]:>8} {name}", flush=True)
        meta.write_text(json.dumps(data))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mutants", type=Path, default=Path("mutants"))
    parser.add_argument("--survivors", type=Path, help="write the surviving mutants' names here")
    parser.add_argument(
        "--recheck", action="store_true", help="run survivors against their module's whole tests"
    )
    args = parser.parse_args()
    if args.recheck:
        for meta in sorted(args.mutants.rglob("*.py.meta")):
            recheck(meta, str(meta.relative_to(args.mutants))[: -len(".meta")])
    rows: dict[str, Counter] = {}
    survivors = []
    for meta in sorted(args.mutants.rglob("*.py.meta")):
        module = str(meta.relative_to(args.mutants))[: -len(".meta")]
        for name, code in json.loads(meta.read_text())["exit_code_by_key"].items():
            status = status_by_exit_code[code]
            rows.setdefault(module, Counter())[status] += 1
            if MAPPING in name:
                rows.setdefault(f"  {module.rsplit('/', 1)[-1]}: sampling_params", Counter())[
                    status
                ] += 1
            if status == "survived":
                survivors.append(name)
    if not rows:
        raise SystemExit("no mutmut results under mutants/: run `make mutation`")
    rows["total"] = sum((c for m, c in rows.items() if not m.startswith(" ")), Counter())
    columns = ("killed", "timeout", "survived", "no tests")
    line = "{:<44}{:>8}" + "{:>10}" * len(columns) + "{:>7}{:>8}"
    print(line.format("module", "mutants", *columns, "other", "score"))
    for module, c in rows.items():
        total = c.total()
        tested = total - c["no tests"] - c["skipped"] - c["not checked"]
        score = f"{100 * (c['killed'] + c['timeout']) / tested:.1f}%" if tested else "-"
        other = total - sum(c[k] for k in columns)  # not checked, suspicious, segfault, ...
        print(line.format(module, total, *(c[k] for k in columns), other, score))
    if args.survivors:
        args.survivors.write_text("".join(f"{name}\n" for name in survivors))
        print(f"{len(survivors)} surviving mutants listed in {args.survivors}")


if __name__ == "__main__":
    main()
