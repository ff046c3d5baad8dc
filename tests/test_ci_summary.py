""".ci/summary.py: the test counts .ci/run prints at the end, read from tox's result journal."""

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Tuple

SCRIPT = Path(__file__).resolve().parent.parent / ".ci" / "summary.py"


def _env(command: List[str], output: str, retcode: int) -> Dict[str, Any]:
    return {"test": [{"command": command, "output": output, "retcode": retcode}]}


def _run(tmp_path: Path, envs: Dict[str, Any]) -> Tuple[int, List[str]]:
    journal = tmp_path / "journal.json"
    journal.write_text(json.dumps({"testenvs": envs}))
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(journal)], capture_output=True, text=True, timeout=30
    )
    return result.returncode, result.stdout.splitlines()


PASSED = "collected 5\n.....\n===== 590 passed, 3 skipped, 1 xfailed in 95.12s (0:01:35) =====\n"
FAILED = "===== 1 failed, 10 passed, 1 error in 3.00s =====\n"
NONE = "collected 0 items\n\n===== no tests ran in 0.01s =====\n"


def test_prints_each_envs_pytest_line_and_the_totals(tmp_path: Path) -> None:
    code, lines = _run(
        tmp_path,
        {
            "py": _env(["python", "-I", "-m", "pytest"], PASSED, 0),
            "py38-min": _env(["python", "-I", "-m", "pytest", "-k", "x"], FAILED, 1),
            "lint": _env(["ruff", "check", "."], "All checks passed!\n", 0),
        },
    )
    assert code == 0
    assert lines == [
        "py: 590 passed, 3 skipped, 1 xfailed in 95.12s (0:01:35)",
        "py38-min: 1 failed, 10 passed, 1 error in 3.00s",
        "total: 600 passed, 2 failed, 3 skipped",
    ]


def test_an_env_whose_pytest_ran_no_test_fails_the_run(tmp_path: Path) -> None:
    code, lines = _run(
        tmp_path,
        {
            "py": _env(["python", "-m", "pytest"], PASSED, 0),
            "py313-min": _env(["python", "-m", "pytest"], NONE, 5),
        },
    )
    assert code == 1
    assert "py313-min: no tests ran in 0.01s" in lines
    assert lines[-1] == "error: pytest ran no test in py313-min"


def test_an_env_cut_short_says_so(tmp_path: Path) -> None:
    code, lines = _run(tmp_path, {"py": _env(["python", "-m", "pytest"], "Traceback...\n", 3)})
    assert code == 1
    assert lines[0] == "py: no pytest summary line (exit 3)"


def test_no_journal(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path / "missing.json")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
