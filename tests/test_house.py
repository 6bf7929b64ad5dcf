"""The house rules that tools enforce: ruff runs before the tests and fails them on a lint error."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _ruff() -> str:
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if not ruff:
        pytest.skip("ruff is not installed (it comes with the dev extra: pip install -e '.[dev]')")
    return ruff


def test_make_test_runs_the_linter_first():
    makefile = (ROOT / "Makefile").read_text()
    test_rule = re.search(r"^test:(.*)$", makefile, re.M).group(1).split()
    assert "lint" in test_rule
    assert re.search(r"^lint:.*\n\t.*ruff check \.", makefile, re.M)


def test_ruff_fails_on_a_lint_error_with_the_project_config(tmp_path):
    """The project's rule set catches a planted error (an unused import and an undefined name) and passes the
    same file once fixed."""
    ruff = _ruff()
    bad = tmp_path / "bad.py"
    bad.write_text("import os\n\n\ndef f():\n    return undefined_name\n")
    run = lambda: subprocess.run([ruff, "check", "--config", str(ROOT / "pyproject.toml"), str(bad)],  # noqa: E731
                                 capture_output=True, text=True, timeout=120)
    proc = run()
    assert proc.returncode == 1 and "F401" in proc.stdout and "F821" in proc.stdout, proc.stdout
    bad.write_text("def f(x):\n    return x\n")
    assert run().returncode == 0
