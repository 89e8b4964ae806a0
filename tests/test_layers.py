"""The layering in pyproject.toml's [tool.importlinter] holds, and it would catch an upward import.

`lint-imports` reads the import graph (lazy imports inside functions included) and checks each
contract; the second test plants one upward import in a copy of the package per pair of layers
and expects the contract to break there, so a contract that could not fail is caught too.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINT = [
    sys.executable,
    "-c",
    "from importlinter.cli import lint_imports_command; lint_imports_command()",
]


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}  # the package under `root`, not the installed one
    return subprocess.run(
        [*LINT, "--no-cache", "--config", str(root / "pyproject.toml")],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_every_contract_is_kept():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(
    ("importer", "imported"),
    [
        ("engram_serve/model/linear.py", "engram_serve.engine.request"),  # model -> engine
        ("engram_serve/offload/pread.py", "engram_serve.model.batch"),  # offload -> model
        ("engram_serve/engram/compression.py", "engram_serve.offload.pread"),  # engram -> offload
        ("engram_serve/kernels/cpu_hash.py", "engram_serve.engram.config"),  # kernels -> engram
        ("engram_serve/engine/output.py", "engram_serve.server.protocol"),  # engine -> server
        ("engram_serve/server/protocol.py", "engram_serve.cli"),  # server -> entry point
    ],
)
def test_an_upward_import_breaks_the_contract(tmp_path, importer, imported):
    shutil.copytree(ROOT / "engram_serve", tmp_path / "engram_serve")
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    with open(tmp_path / importer, "a") as f:
        f.write(f"\nimport {imported}  # noqa: E402\n")
    result = lint_imports(tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    module = importer.removesuffix(".py").replace("/", ".")
    assert f"{module} -> {imported}" in result.stdout
