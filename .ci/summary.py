"""Print each test env's pytest summary line from tox's result journal (``--result-json``).

    python .ci/summary.py JOURNAL.json

One line per env that ran pytest, as pytest said it (``py: 590 passed, 3 skipped in 95.12s``),
then the totals as ``total: N passed, N failed, N skipped``. Exits 1 if an env's pytest ran no
test at all (pytest's exit 5, or a summary without a count): the default env_list never does,
so tests went missing; 2 if the journal cannot be read. Standard library only, Python 3.8+: .ci/run
runs it with the Python that bootstrapped tox.
"""

import json
import re
import sys
from typing import Any, Dict, List, Optional

# pytest's last line: "===== 590 passed, 3 skipped, 1 xfailed in 95.12s (0:01:35) =====".
SUMMARY = re.compile(r"^=+ (.*? in [0-9.]+s(?: \([0-9:]+\))?) =+$")
COUNT = re.compile(r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed|deselected|warnings?)")
NO_TESTS = 5  # pytest's exit code when it collected nothing


def pytest_summary(env: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The summary line and exit code of the env's last pytest command, or None if it ran none."""
    found = None
    for command in env.get("test", []):
        if not any("pytest" in part for part in command.get("command", [])):
            continue
        lines = [SUMMARY.match(line.strip()) for line in command.get("output", "").splitlines()]
        matches = [m.group(1) for m in lines if m]
        found = {"line": matches[-1] if matches else None, "retcode": command.get("retcode")}
    return found


def main(argv: List[str]) -> int:
    try:
        with open(argv[1], encoding="utf-8") as handle:
            envs = json.load(handle).get("testenvs", {})
    except (IndexError, OSError, ValueError) as exc:
        print("no tox result journal to read (%s)" % exc)
        return 2
    totals = {"passed": 0, "failed": 0, "skipped": 0}
    empty = []
    for name, env in envs.items():
        summary = pytest_summary(env)
        if summary is None:
            continue
        line, retcode = summary["line"], summary["retcode"]
        counts = {kind: int(n) for n, kind in COUNT.findall(line or "")}
        ran = sum(counts.get(k, 0) for k in ("passed", "failed", "error", "errors", "xfailed"))
        if retcode == NO_TESTS or not ran:
            empty.append(name)
        print("%s: %s" % (name, line or "no pytest summary line (exit %s)" % retcode))
        totals["passed"] += counts.get("passed", 0)
        totals["failed"] += sum(counts.get(k, 0) for k in ("failed", "error", "errors"))
        totals["skipped"] += counts.get("skipped", 0)
    print("total: %(passed)d passed, %(failed)d failed, %(skipped)d skipped" % totals)
    if empty:
        print("error: pytest ran no test in %s" % ", ".join(empty))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
