"""Every slurm/*.sh GPU recipe names an experiment whose layout is valid for the allocation its
#SBATCH header asks for; slurm/cpu_tiny.sh asks for no GPU; every recipe keeps its output across
requeues and asks for the stop signal; every dry run prints one command per rank."""

import os
import re
import subprocess
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from megatron_qwen2.config import resolve_config

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted(p for p in (ROOT / "slurm").glob("*.sh") if p.name != "launch.sh")
GPU_RECIPES = [p for p in RECIPES if p.name != "cpu_tiny.sh"]


def header(script: Path, option: str) -> str:
    match = re.search(rf"^#SBATCH --{option}=(\S+)", script.read_text(), re.M)
    assert match, f"{script.name} has no #SBATCH --{option}"
    return match.group(1)


def experiment_of(script: Path) -> str:
    return re.search(r"launch\.sh\" (\S+)", script.read_text()).group(1)


@pytest.mark.parametrize("script", RECIPES, ids=lambda p: p.stem)
def test_recipe_keeps_its_output_across_requeues_and_asks_for_the_stop_signal(script):
    assert header(script, "open-mode") == "append"
    assert re.search(r"^#SBATCH --requeue$", script.read_text(), re.M)
    assert re.fullmatch(r"USR1@\d+", header(script, "signal"))
    assert "B:USR1@" in script.read_text()  # the header comment names the batch-shell form too


def test_cpu_recipe_asks_for_no_gpu_and_trains_the_tiny_model_on_cpus(tmp_path):
    script = ROOT / "slurm/cpu_tiny.sh"
    assert not re.search(r"^#SBATCH --(gpus|gres|exclusive)", script.read_text(), re.M)
    env = dict(os.environ, DRY_RUN="1", RUN_ROOT=str(tmp_path))
    for key in ("SLURM_JOB_ID", "LAUNCH_DEVICE", "NODES", "TASKS_PER_NODE"):
        env.pop(key, None)
    out = subprocess.run(["bash", str(script), "train.steps=7"], env=env, capture_output=True, text=True,
                         check=True).stdout
    ranks = [line for line in out.splitlines() if not line.startswith("#")]
    assert len(ranks) == int(header(script, "ntasks-per-node")) == 2
    assert "device=cpu" in ranks[0] and "+experiment=cpu_tiny" in ranks[0]
    assert ranks[0].endswith("train.steps=7") and f"hydra.run.dir={tmp_path}/cpu_tiny" in ranks[0]


def test_every_model_has_a_recipe():
    names = {p.stem for p in RECIPES}
    assert {"72b", "57b_a14b", "7b", "1.5b", "0.5b"} <= names


@pytest.mark.parametrize("script", GPU_RECIPES, ids=lambda p: p.stem)
def test_recipe_layout_fits_its_allocation(script):
    world = int(header(script, "nodes")) * int(header(script, "ntasks-per-node"))
    assert int(header(script, "gpus-per-node")) == int(header(script, "ntasks-per-node"))
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = resolve_config(compose(config_name="config", overrides=[f"+experiment={experiment_of(script)}"]), world)
    assert cfg.device == "cuda" and cfg.train.dtype == "bf16"
    p = cfg.parallel
    dp = world // (p.tp * p.pp * p.cp)
    assert dp * p.tp * p.pp * p.cp == world


@pytest.mark.parametrize("script", GPU_RECIPES, ids=lambda p: p.stem)
def test_dry_run_prints_every_rank(script, tmp_path):
    env = dict(os.environ, DRY_RUN="1", NODES="2", TASKS_PER_NODE="4", RUN_ROOT=str(tmp_path))
    env.pop("SLURM_JOB_ID", None)
    out = subprocess.run(["bash", str(script), "train.steps=7"], env=env, capture_output=True, text=True, check=True).stdout
    ranks = [line for line in out.splitlines() if not line.startswith("#")]
    assert len(ranks) == 8
    assert ranks[5].startswith("node1: ") and "RANK=5 LOCAL_RANK=1 WORLD_SIZE=8" in ranks[5]
    assert f"+experiment={experiment_of(script)}" in ranks[0] and ranks[0].endswith("train.steps=7")
    assert f"hydra.run.dir={tmp_path}/{script.stem}" in ranks[0]
    assert not list(tmp_path.iterdir())  # a dry run writes nothing


def test_launcher_rejects_bad_device(tmp_path):
    env = dict(os.environ, DRY_RUN="1", LAUNCH_DEVICE="tpu")
    res = subprocess.run(["bash", str(ROOT / "slurm/7b.sh")], env=env, capture_output=True, text=True)
    assert res.returncode == 2 and "LAUNCH_DEVICE=tpu" in res.stderr
