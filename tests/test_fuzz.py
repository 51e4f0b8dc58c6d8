"""The fuzz suite (``python -m fuzz``) on a fixed seed and a bounded budget.

About two minutes on 2 cores, fixtures included (they are cached per sparsec source in
build/fuzz-cache). Every case runs in its own process; the test fails on any crash,
hang, raw traceback, silently wrong result or overwritten input, and prints the
per-class summary (``pytest -s`` shows it on success too). Reproduce a failing case
with ``python -m fuzz --replay CLASS:SEED:INDEX``; the long mode is
``python -m fuzz --seed 1 --budget-seconds 3600`` (see fuzz/__init__.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SEED = 0
BUDGET_SECONDS = 110
# The longest case timeout (the CLI and sparsify classes) on top of the budget.
HARD_LIMIT = BUDGET_SECONDS + 300


def test_fuzz_suite_finds_nothing(tmp_path):
    report = tmp_path / "fuzz.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fuzz",
            "--seed",
            str(SEED),
            "--budget-seconds",
            str(BUDGET_SECONDS),
            "--report",
            str(report),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=HARD_LIMIT,
    )
    print(proc.stdout)
    assert report.exists(), f"the fuzz run wrote no report:\n{proc.stderr[-4000:]}"
    data = json.loads(report.read_text())
    classes = data["classes"]
    assert set(classes) == {"artifact", "graph", "runtime", "cli", "sparsify"}
    for name, info in classes.items():
        assert sum(info["counts"].values()) > 0, f"no {name} case ran"
    failures = data["failures"]
    listed = "\n".join(
        f"{f['case']} [{f['kind']}] {f['outcome']}: {f['desc'][:200]}\n    -> {f['detail'][:400]}"
        for f in failures[:30]
    )
    assert not failures, f"{len(failures)} fuzz failure(s):\n{listed}\n\n{proc.stdout[-6000:]}"
    assert proc.returncode == 0, proc.stderr[-4000:]
