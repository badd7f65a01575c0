"""The import contracts in ``.importlinter`` hold (imports point down; the run side is torch-free
and free of the build wing), and each one breaks when a wrong-way import is written.

Each contract runs in its own ``lint-imports`` process on the package that this test session
imports, so a failure names the contract and prints import-linter's chain of imports.
"""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import cops_deploy

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / ".importlinter"
PACKAGE_DIR = Path(cops_deploy.__file__).resolve().parent
CONTRACT_PREFIX = "importlinter:contract:"
RUN_LINTER = "from importlinter.cli import lint_imports_command; lint_imports_command()"

# One wrong-way import per contract, written into a copy of the package: (contract, file,
# code appended, text import-linter must report). Lazy imports inside functions count too.
BREAKS: tuple[tuple[str, str, str, str], ...] = (
    (
        "layers",
        "data/meta.py",
        "import cops_deploy.train.policy  # noqa",
        "cops_deploy.data.meta -> cops_deploy.train.policy",
    ),
    ("layers", "plugins.py", '"""A subpackage no layer names."""', "cops_deploy.plugins"),
    (
        "run-side-no-torch",
        "imaging/decode.py",
        "def _lazy() -> None:\n    import torch  # noqa",
        "cops_deploy.imaging.decode -> torch",
    ),
    (
        "run-side-no-build-wing",
        "fileio.py",
        "def _lazy() -> None:\n    import cops_deploy.data.meta  # noqa",
        "cops_deploy.fileio -> cops_deploy.data.meta",
    ),
    (
        "model-data-train-evaluate-no-runtime",
        "model/head.py",
        "from cops_deploy.runtime import contract  # noqa",
        "cops_deploy.model.head -> cops_deploy.runtime.contract",
    ),
    (
        "root-is-a-facade",
        "configs/__init__.py",
        "def _lazy() -> None:\n    from cops_deploy import create_model  # noqa",
        "cops_deploy.configs -> cops_deploy",
    ),
)


def contract_ids() -> list[str]:
    """The ids of the contracts declared in ``.importlinter``."""
    parser = configparser.ConfigParser()
    if not parser.read(CONFIG):
        raise FileNotFoundError(f"{CONFIG} is missing: the import contracts live there")
    return [
        s.removeprefix(CONTRACT_PREFIX) for s in parser.sections() if s.startswith(CONTRACT_PREFIX)
    ]


def lint_imports(package_parent: Path, contract: str) -> subprocess.CompletedProcess[str]:
    """Run one contract of ``.importlinter`` on the ``cops_deploy`` found in ``package_parent``."""
    if shutil.which("lint-imports", path=str(Path(sys.executable).parent)) is None:
        pytest.fail("import-linter is not installed. Fix: pip install -e '.[dev]'")
    path = os.pathsep.join(p for p in (str(package_parent), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path, "COLUMNS": "250", "NO_COLOR": "1"}
    args = [sys.executable, "-c", RUN_LINTER, str(CONFIG), "--no-cache", "--no-logo"]
    return subprocess.run(
        [*args, "--contract", contract],
        cwd=package_parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize("contract", contract_ids())
def test_contract_holds(contract: str) -> None:
    result = lint_imports(PACKAGE_DIR.parent, contract)
    assert result.returncode == 0, f"contract {contract!r} is broken:\n{result.stdout}"
    assert "BROKEN" not in result.stdout and "KEPT" in result.stdout, result.stdout


def test_every_contract_has_a_break_example() -> None:
    assert sorted({b[0] for b in BREAKS}) == sorted(contract_ids())


@pytest.fixture(scope="module")
def broken_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the package with every wrong-way import of BREAKS written into it."""
    parent = tmp_path_factory.mktemp("broken")
    copy = parent / "cops_deploy"
    shutil.copytree(PACKAGE_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    for _, rel, code, _ in BREAKS:
        target = copy / rel
        text = target.read_text() if target.exists() else ""
        target.write_text(f"{text}\n{code}\n")
    return parent


@pytest.mark.parametrize("contract", sorted({b[0] for b in BREAKS}))
def test_a_wrong_way_import_breaks_the_contract(broken_copy: Path, contract: str) -> None:
    result = lint_imports(broken_copy, contract)
    assert result.returncode != 0, f"contract {contract!r} missed the breaks:\n{result.stdout}"
    for _, rel, _, reported in (b for b in BREAKS if b[0] == contract):
        assert reported in result.stdout, f"{rel}: {reported!r} not reported:\n{result.stdout}"
