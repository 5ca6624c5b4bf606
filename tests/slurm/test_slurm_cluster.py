"""The real `sbatch slurm/72b.sh` (and slurm/cpu_tiny.sh, the README's CPU example) on a one-node
Slurm cluster started on this machine, shrunk to the tiny model on CPUs with gloo: it trains and
checkpoints; the stop signal, to the tasks or to the batch shell, makes it save, the launcher
requeues the job on the outcome training recorded, and the requeued job resumes from that
checkpoint, appending to the same output file.

Needs root and Debian's slurm-wlm + munge (CI installs them); skipped otherwise, unless
MEGATRON_QWEN2_REQUIRE_SLURM=1, which turns a missing Slurm into a failure.
"""

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOOLS = ("sbatch", "squeue", "scontrol", "scancel", "slurmctld", "slurmd", "munged")
_missing = [t for t in TOOLS if shutil.which(t) is None]
if (_missing or os.geteuid() != 0) and os.environ.get("MEGATRON_QWEN2_REQUIRE_SLURM") != "1":
    pytest.skip(f"needs root and Slurm (missing: {_missing or 'root'})", allow_module_level=True)

TINY = ["model=tiny", "parallel.tp=1", "parallel.pp=2", "parallel.vpp=1", "parallel.distributed_optimizer=false",
        "train.dtype=fp32", "train.seq_length=32", "train.global_batch_size=4", "train.micro_batch_size=1",
        "train.log_interval=1", "data.max_files=20"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    state = tmp_path_factory.mktemp("slurm")
    subprocess.run(["bash", str(ROOT / "slurm/testing/cluster.sh"), "start", str(state)], check=True)
    env = dict(os.environ, SLURM_CONF=str(state / "slurm.conf"), LAUNCH_DEVICE="cpu")
    yield env
    subprocess.run(["scancel", "--user=root"], env=env)
    subprocess.run(["bash", str(ROOT / "slurm/testing/cluster.sh"), "stop", str(state)], check=True)


# What the GPU recipes' headers ask for, shrunk to this machine; slurm/cpu_tiny.sh's header fits as it is.
ONE_NODE = ["--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1"]


def submit(env, run_dir: Path, *overrides: str, script: str = "72b.sh", base: list[str] = TINY) -> str:
    shrink = [] if script == "cpu_tiny.sh" else ONE_NODE
    cmd = ["sbatch", "--parsable", *shrink, f"--output={run_dir}.slurm-%j.out", str(ROOT / "slurm" / script),
           *base, *overrides]
    out = subprocess.run(cmd, env=dict(env, RUN_DIR=str(run_dir)), cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    return out.strip().split(";")[0]


def job_state(env, job: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True).stdout
    match = re.search(r"JobState=(\S+)", out)
    return match.group(1) if match else "UNKNOWN"


def wait_for(predicate, timeout: float, what: str, env=None, job=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(1)
    detail = "" if job is None else subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True,
                                                   text=True).stdout
    raise AssertionError(f"timed out waiting for {what}\n{detail}")


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def job_output(run_dir: Path) -> str:
    return "\n".join(p.read_text() for p in sorted(run_dir.parent.glob(run_dir.name + ".slurm-*.out")))


def test_sbatch_72b_recipe_trains_tiny_model_on_cpus(cluster, tmp_path):
    run_dir = tmp_path / "run"
    job = submit(cluster, run_dir, "train.steps=6", "train.save_interval=3")
    wait_for(lambda: job_state(cluster, job) in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), 300, "the job",
             cluster, job)
    assert job_state(cluster, job) == "COMPLETED", job_output(run_dir)
    assert [m["step"] for m in metrics(run_dir)] == [1, 2, 3, 4, 5, 6]
    assert (run_dir / "checkpoints/latest").read_text().strip() == "step_000006"
    assert (run_dir / "checkpoints/step_000003").is_dir()
    log = (run_dir / f"logs/job-{job}.log").read_text()
    assert "2 ranks" in log and "0: step 6" in log  # both ranks ran; rank 0 logged


# The stop signal both ways: to the job step's tasks (what `#SBATCH --signal=USR1@600` does), and to
# the batch shell alone (`#SBATCH --signal=B:USR1@600`), which launch.sh traps and forwards.
SIGNALS = {
    "steps": (["--signal=USR1"], "72b.sh", TINY),
    "batch_shell": (["--signal=USR1", "--batch"], "cpu_tiny.sh",
                    ["train.seq_length=32", "train.global_batch_size=4", "train.micro_batch_size=1",
                     "train.log_interval=1", "data.max_files=20", "train.save_interval=0"]),
}


@pytest.mark.parametrize("how", sorted(SIGNALS))
def test_stop_signal_saves_and_the_requeued_job_resumes(cluster, tmp_path, how):
    scancel_args, script, base = SIGNALS[how]
    run_dir = tmp_path / "run"
    steps = 300  # the signal, sent after step 3, must arrive well before the last step
    job = submit(cluster, run_dir, f"train.steps={steps}", script=script, base=base)
    wait_for(lambda: len(metrics(run_dir)) >= 3, 300, "the first training steps", cluster, job)
    # Training saves at the next step boundary and stops with code 75 (outcome.json says so); the
    # launcher requeues the job on that, and the next start resumes from `latest`.
    subprocess.run(["scancel", *scancel_args, job], env=cluster, check=True)
    job_log = run_dir / f"logs/job-{job}.log"
    wait_for(lambda: "decision: requeue job" in job_log.read_text(), 300, f"the requeue\n{job_output(run_dir)}",
             cluster, job)

    def restarted() -> bool:
        # Slurm holds a requeued job for about two minutes before it may start again; skip the wait.
        if job_state(cluster, job) == "PENDING":
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=cluster, capture_output=True)
        return "restart 1" in job_log.read_text()

    wait_for(restarted, 300, "the requeued start", cluster, job)
    wait_for(lambda: job_state(cluster, job) in ("COMPLETED", "FAILED", "CANCELLED"), 300, "the requeued job",
             cluster, job)
    log = job_log.read_text()
    assert job_state(cluster, job) == "COMPLETED", log
    if how == "batch_shell":
        assert "the batch shell got SIGUSR1; forwarding it to the job step" in log, log
    saved = re.search(r"saved checkpoint step_0*(\d+)", log)
    assert saved and 3 <= int(saved.group(1)) < steps, log
    assert (f"decision: requeue job {job}: {run_dir / 'outcome.json'} says exit 75 (preempted) at step "
            f"{saved.group(1)}") in log, log
    assert re.search(rf"resumed from .* at step {saved.group(1)}\b", log), log
    assert f"decision: no requeue: {run_dir / 'outcome.json'} says exit 0 (completed) at step {steps}" in log, log
    # Every step ran exactly once: the second run continued after the saved step.
    assert [m["step"] for m in metrics(run_dir)] == list(range(1, steps + 1))
    assert (run_dir / "checkpoints/latest").read_text().strip() == f"step_{steps:06d}"
    # --open-mode=append: the job's output file holds both starts.
    out = job_output(run_dir)
    assert "restart 0" in out and "restart 1" in out and "decision: requeue job" in out, out


def test_a_failed_start_stops_the_daemons_it_started(tmp_path):
    # A slurmctld that cannot start: munged, already running, must be stopped again.
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "slurmctld").write_text("#!/bin/sh\nexit 1\n")
    (fake / "slurmctld").chmod(0o755)
    state = tmp_path / "state"
    env = dict(os.environ, PATH=f"{fake}:{os.environ['PATH']}", SLURMCTLD_PORT="7917", SLURMD_PORT="7918")
    res = subprocess.run(["bash", str(ROOT / "slurm/testing/cluster.sh"), "start", str(state)], env=env,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and "cluster.sh: slurmctld did not start" in res.stderr, res.stderr
    assert not (state / "munged.pid").exists()
    running = subprocess.run(["pgrep", "-f", f"munged.*{state}"], capture_output=True, text=True).stdout
    assert not running.strip(), running


def test_upcycle_recipe_upcycles_a_dense_checkpoint_and_trains_from_it(cluster, tmp_path):
    dense = tmp_path / "dense"
    subprocess.run(["python", "-m", "megatron_qwen2.train", "model=tiny", "train.steps=1", "data.max_files=20",
                    f"hydra.run.dir={dense}"], cwd=ROOT, check=True, capture_output=True)
    run_dir = tmp_path / "run"
    env = dict(cluster, DENSE_CKPT=str(dense / "checkpoints"),
               UPCYCLE_ARGS="--num-experts 4 --top-k 2 --expert-ffn-size 64 --shared-expert-ffn-size 128 "
                            "--reinit-fraction 0.5")
    base = [t for t in TINY if not t.startswith(("model=", "parallel.pp="))] + ["parallel.pp=1", "parallel.ep=2"]
    job = submit(env, run_dir, "train.steps=3", script="upcycle_57b_a14b.sh", base=base)
    wait_for(lambda: job_state(cluster, job) in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), 300, "the job",
             cluster, job)
    assert job_state(cluster, job) == "COMPLETED", job_output(run_dir)
    upcycled = json.loads((run_dir / "upcycled/model_config.json").read_text())
    assert (upcycled["num_experts"], upcycled["moe_top_k"], upcycled["hidden_size"]) == (4, 2, 128)
    log = (run_dir / f"logs/job-{job}.log").read_text()
    assert f"initialised the weights from {run_dir / 'upcycled'}" in log
    rows = metrics(run_dir)
    assert [m["step"] for m in rows] == [1, 2, 3] and all("aux_loss" in m for m in rows)
