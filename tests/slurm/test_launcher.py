"""slurm/launch.sh's decision, with stand-ins for srun and scontrol: it requeues exactly when the
job step's outcome.json names one of errors.REQUEUE_CODES, never on a stale outcome.json, and exits
with the recorded code; and slurm/testing/cluster.sh refuses ports already in use."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_qwen2.errors import EXIT_CONFIG, EXIT_HANG, EXIT_NONFINITE, EXIT_OK, EXIT_PREEMPTED, REQUEUE_CODES

ROOT = Path(__file__).resolve().parents[2]

# The job step: rank 0 records FAKE_OUTCOME_CODE in outcome.json (none when unset), srun exits FAKE_SRUN_EXIT.
FAKE_SRUN = """#!/bin/sh
if [ -n "${FAKE_OUTCOME_CODE:-}" ]; then
  printf '{"exit_code": %s, "reason": "recorded", "step": 7, "message": ""}\\n' "$FAKE_OUTCOME_CODE" \\
    > "$RUN_DIR/outcome.json"
fi
exit "${FAKE_SRUN_EXIT:-0}"
"""
FAKE_SCONTROL = """#!/bin/sh
case "$1" in
  show) echo node0 ;;
  requeue) echo "$2" >> "$FAKE_REQUEUES" ;;
esac
"""


def launch(tmp_path: Path, outcome_code=None, srun_exit=0, stale_outcome=False):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    run_dir = tmp_path / "run"
    if stale_outcome:  # what an earlier job left: it must not decide for this one
        run_dir.mkdir()
        (run_dir / "outcome.json").write_text(json.dumps({"exit_code": EXIT_PREEMPTED, "reason": "preempted"}))
    requeues = tmp_path / "requeues"
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="42", SLURM_JOB_NODELIST="node0",
               SLURM_NTASKS="2", RUN_DIR=str(run_dir), PYTHON=sys.executable, MEGATRON_QWEN2_HOME=str(ROOT),
               LAUNCH_DEVICE="cpu", FAKE_REQUEUES=str(requeues), FAKE_SRUN_EXIT=str(srun_exit))
    env.pop("DRY_RUN", None)
    if outcome_code is not None:
        env["FAKE_OUTCOME_CODE"] = str(outcome_code)
    res = subprocess.run(["bash", str(ROOT / "slurm/launch.sh"), "cpu_tiny"], env=env,
                         capture_output=True, text=True, timeout=60)
    requeued = requeues.read_text().split() if requeues.exists() else []
    return res, requeued, (run_dir / "logs/job-42.log").read_text()


@pytest.mark.parametrize("code", [EXIT_PREEMPTED, EXIT_HANG, EXIT_OK, EXIT_CONFIG, EXIT_NONFINITE])
def test_requeues_exactly_on_the_requeue_codes_and_exits_with_the_recorded_code(tmp_path, code):
    res, requeued, log = launch(tmp_path, outcome_code=code, srun_exit=137)  # srun's own code does not decide
    assert res.returncode == code, res.stdout + res.stderr
    decision = [line for line in log.splitlines() if line.startswith("launch.sh: decision:")]
    assert len(decision) == 1, log
    if code in REQUEUE_CODES:
        assert requeued == ["42"]
        assert f"decision: requeue job 42: {tmp_path / 'run/outcome.json'} says exit {code} (recorded) at step 7" \
               in decision[0]
    else:
        assert requeued == []
        assert f"decision: no requeue: {tmp_path / 'run/outcome.json'} says exit {code} (recorded)" in decision[0]


def test_a_stale_outcome_is_removed_before_the_step_and_no_outcome_means_no_requeue(tmp_path):
    res, requeued, log = launch(tmp_path, outcome_code=None, srun_exit=137, stale_outcome=True)
    assert res.returncode == 137 and requeued == []
    assert "decision: no requeue: the job step ended (srun exit 137) without writing" in log, log
    assert not (tmp_path / "run/outcome.json").exists()


def test_cluster_refuses_a_port_in_use(tmp_path):
    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = dict(os.environ, SLURMCTLD_PORT=str(port), SLURMD_PORT=str(port + 1))
        res = subprocess.run(["bash", str(ROOT / "slurm/testing/cluster.sh"), "start", str(tmp_path / "state")],
                             env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [res.stderr.strip()]  # one line
    assert f"port {port} (SLURMCTLD_PORT={port}) is already in use" in res.stderr
    assert not list((tmp_path / "state").glob("*.pid"))
