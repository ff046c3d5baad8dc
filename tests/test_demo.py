"""examples/demo.py (``tox -e demo``) against the session's server: every change is seen, and its
two time columns are labelled and explained before the first row."""

import os
import re
import subprocess
import sys
from pathlib import Path

import changeloop

DEMO = Path(__file__).resolve().parent.parent / "examples" / "demo.py"


def test_demo_labels_its_columns(couchdb_url: str) -> None:
    env = dict(os.environ, COUCHDB_URL=couchdb_url)
    env["PYTHONPATH"] = str(Path(changeloop.__file__).resolve().parent.parent)
    result = subprocess.run(
        [sys.executable, str(DEMO), "--docs", "3"],
        capture_output=True,
        text=True,
        timeout=50,
        env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["elapsed", "latency"])
    assert "elapsed: s since following began" in lines[header - 1]
    assert "latency: ms from save_doc to callback" in lines[header - 1]
    rows = [line for line in lines[header + 1 :] if re.match(r"\s*\d+\.\d{3}\s", line)]
    assert [row.split()[3] for row in rows] == ["demo-000", "demo-001", "demo-002"]
    assert all(re.fullmatch(r"\d+\.\d", row.split()[1]) for row in rows), rows  # a latency each
    assert lines[-1].startswith("saw 3 of 3 changes")
