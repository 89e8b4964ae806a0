"""The mutation score per module from mutmut's results (mutants/**/*.py.meta), for `make mutation`.

score = (killed + timeout) / (mutants with tests); "no tests" (no selected test runs the
function) is counted apart. A row for `SamplingRequest.sampling_params` (the HTTP -> SamplingParams
mapping) follows protocol.py's. `--survivors FILE` writes the surviving mutants' names to FILE.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from mutmut.stats import status_by_exit_code

MAPPING = "xǁSamplingRequestǁsampling_params__mutmut_"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mutants", type=Path, default=Path("mutants"))
    parser.add_argument("--survivors", type=Path, help="write the surviving mutants' names here")
    args = parser.parse_args()
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
