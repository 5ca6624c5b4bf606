"""The outcome marker: `RUN_DIR/outcome.json`, written by rank 0 when training ends.

    {"exit_code": 75, "reason": "preempted", "step": 1200, "message": "...", "time": "..."}

It is how a script (and slurm/launch.sh) learns why a run stopped when the process that
started it cannot say: torchrun exits 1 whatever its workers returned, and srun may report a
signal for ranks it killed after the first one left. The launcher removes it before starting
a job step and requeues when it names one of errors.REQUEUE_CODES. It is replaced
atomically, so a reader never sees half a file.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Optional

OUTCOME_FILE = "outcome.json"


def write_outcome(run_dir: Path, exit_code: int, reason: str, step: Optional[int] = None,
                  message: str = "") -> None:
    """Record how this run ended (call on rank 0 only). Never raises: a run dir that cannot be
    written is itself an outcome the caller is already reporting."""
    record = {"exit_code": exit_code, "reason": reason, "step": step, "message": message,
              "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    path = Path(run_dir) / OUTCOME_FILE
    tmp = path.with_name(f".{OUTCOME_FILE}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(record) + "\n")
        os.replace(tmp, path)
    except OSError:
        try:
            tmp.unlink()
        except OSError:
            pass


def read_outcome(run_dir: Path) -> Optional[dict]:
    """The recorded outcome, or None when there is none (or it is unreadable)."""
    try:
        return json.loads((Path(run_dir) / OUTCOME_FILE).read_text())
    except (OSError, ValueError):
        return None
