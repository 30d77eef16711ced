"""Fault injection for the kill tests: named points in the stages where a test can have the process killed.

`FASHIONCAP_KILL_AT=name` (several: comma-separated) kills the whole process group with SIGKILL the first time
the running code reaches a point of that name, as a machine losing power or an OOM killer would: nothing
is flushed, no handler runs. Unset (always, outside the tests), a point costs one dictionary lookup.
tests/e2e/test_kill_anywhere.py walks a pipeline run through every point in `POINTS` and checks that the
re-runs lose nothing.
"""

from __future__ import annotations

import os
import signal

ENV = "FASHIONCAP_KILL_AT"
# every point, in the order a pipeline run reaches them
POINTS = (
    "prepare.saved",  # the prepared dataset written, metrics not yet
    "train.started",  # the MLflow run started and named in run.json, no step taken
    "checkpoint.state_written",  # a checkpoint's tensors written beside the last one, its metadata not yet
    "checkpoint.swap_between_renames",  # a checkpoint folder renamed aside, its replacement not yet in place
    "train.published",  # models/best in place, metrics and logs not yet written
    "checkpoint.discard_renamed",  # the finished run's checkpoint renamed aside, not yet deleted
    "evaluate.written",  # eval.json and the predictions written, not yet logged to MLflow
    "report.written",  # the report written, its MLflow artifact not yet logged
    "register.logged",  # the model logged into the run, not yet registered
    "register.registered",  # the version registered, the candidate alias not yet moved
)


def point(name: str) -> None:
    """Kills this process group here if the environment asks for it (see the module's doc)."""
    wanted = os.environ.get(ENV)
    if wanted and name in wanted.split(","):
        os.killpg(os.getpgrp(), signal.SIGKILL)
