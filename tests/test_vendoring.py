"""Vendoring: a copy of changeloop/ inside another package works under that package's name."""

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import changeloop

CHILD = """
import sys
sys.path.insert(0, {root!r})
from some_app._vendor.changeloop import Consumer, Server, __version__

with Server({url!r}) as server:
    db = server.create_db({db!r})
    db.save_doc({{"_id": "vendored"}})
    seen = []
    consumer = Consumer(db)
    consumer.wait(lambda change: seen.append(change["id"]), since=0, limit=1)
    consumer.close()
    server.delete_db({db!r})

leaked = sorted(m for m in sys.modules if m == "changeloop" or m.startswith("changeloop."))
print(__version__, seen, leaked)
"""


def test_vendored_copy_runs_a_consumer_end_to_end(
    tmp_path: Path, couchdb_url: str, db_name: str
) -> None:
    vendor = tmp_path / "some_app" / "_vendor"
    vendor.mkdir(parents=True)
    (tmp_path / "some_app" / "__init__.py").write_text("")
    (vendor / "__init__.py").write_text("")
    source = Path(changeloop.__file__).resolve().parent
    shutil.copytree(source, vendor / "changeloop", ignore=shutil.ignore_patterns("__pycache__"))
    code = textwrap.dedent(CHILD).format(root=str(tmp_path), url=couchdb_url, db=db_name)
    # -I: a clean interpreter that cannot see the repository or PYTHONPATH; an installed
    # changeloop in site-packages must not be needed, and is checked not to be imported.
    result = subprocess.run(
        [sys.executable, "-I", "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [changeloop.__version__, "['vendored']", "[]"]
