"""freeze_startup_heap: after a server's start-up, a full garbage collection walks only what was built
since, not the 100k+ objects start-up built (each full collection stops every thread while it walks)."""
from __future__ import annotations

import subprocess
import sys

from tests.support.procs import REPO

PROBE = """
import gc, json, sys
import bridge.serve, mis_adapter.serve
from yindian_common.gc_pauses import freeze_startup_heap
before = len(gc.get_objects())
frozen = freeze_startup_heap()
print(json.dumps([before, frozen, len(gc.get_objects())]))
"""


def test_a_full_collection_after_start_up_walks_only_what_came_later() -> None:
    run = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    before, frozen, walked = (int(x) for x in run.stdout.strip().strip("[]").split(","))
    assert before > 50_000 and frozen >= before // 2
    assert walked < before // 20
