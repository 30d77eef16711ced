"""An entry point's collector is set for a short-lived process: rare full passes, nothing walked at exit."""

from __future__ import annotations

import subprocess
import sys

from fashioncap.runtime import COLLECTOR_THRESHOLDS

# a stage's entry: a handler registered before run_stage runs after its own (atexit is last in, first out),
# so it sees what the interpreter's shutdown will see
ENTRY = """
import atexit, gc, sys
atexit.register(lambda: print("frozen at exit", gc.get_freeze_count() > 0, flush=True))
from fashioncap.runtime import run_stage
run_stage(lambda: print("thresholds", *gc.get_threshold(), flush=True))
"""


def test_a_stage_entry_raises_the_collector_thresholds_and_freezes_what_lives_at_exit():
    proc = subprocess.run([sys.executable, "-c", ENTRY], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "thresholds " + " ".join(map(str, COLLECTOR_THRESHOLDS))
    assert COLLECTOR_THRESHOLDS[0] > 700  # above Python's default first generation
    assert lines[-1] == "frozen at exit True"


def test_a_process_that_is_no_entry_point_keeps_pythons_collector():
    proc = subprocess.run([sys.executable, "-c", "import gc, fashioncap.runtime; print(*gc.get_threshold())"],
                          capture_output=True, text=True, timeout=120, check=True)
    assert proc.stdout.split() == ["700", "10", "10"]  # importing the library changes nothing
