"""Every Python block of the README runs, in order, against the real server."""

import re
from pathlib import Path
from typing import Any, Dict, List

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
DEFAULT_URL = "http://127.0.0.1:5984"


def python_blocks() -> List[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)


def test_readme_has_python_blocks() -> None:
    assert len(python_blocks()) >= 3


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_readme_block_runs(
    index: int, couchdb_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    monkeypatch.chdir(tmp_path)  # blocks may write files (a checkpoint)
    code = python_blocks()[index]
    assert DEFAULT_URL in code, "README blocks talk to the default URL, replaced here"
    namespace: Dict[str, Any] = {"__name__": "readme"}
    exec(
        compile(code.replace(DEFAULT_URL, couchdb_url), "README.md[%d]" % index, "exec"), namespace
    )
    assert capsys.readouterr().out  # every block shows something
