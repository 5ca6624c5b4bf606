"""Faults in the input of tools/convert_checkpoint.py and tools/upcycle.py: a deleted, truncated or
bit-flipped shard, a missing input, bad flags, an upcycling that cannot fit. Each must end in one
line naming the file or the numbers, exit code 2, no traceback, and nothing on disk changed."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_qwen2.checkpoint import expected_native_shapes, save_native
from megatron_qwen2.checkpoint.convert import main as convert
from megatron_qwen2.checkpoint.native import load_model_config
from megatron_qwen2.checkpoint.upcycle import (HostResources, UpcycleArgs, check_fits, estimate_upcycle,
                                               stored_tensors)
from megatron_qwen2.checkpoint.upcycle import main as upcycle
from megatron_qwen2.config import Config, DataConfig, ModelConfig, TrainConfig
from megatron_qwen2.errors import EXIT_CONFIG, ConfigError
from megatron_qwen2.train import train

ROOT = Path(__file__).resolve().parents[2]
MODEL = dict(hidden_size=32, num_layers=2, num_attention_heads=4, num_kv_heads=2, ffn_hidden_size=64, vocab_size=4096)
UPCYCLE = ["--num-experts", "4", "--top-k", "2", "--expert-ffn-size", "16", "--shared-expert-ffn-size", "0",
           "--no-progress"]


def make_checkpoints(root: Path) -> dict[str, Path]:
    """A training checkpoint (one step of a tiny run; its run's checkpoints/ dir) and a native one."""
    cfg = Config(model=ModelConfig(**MODEL), data=DataConfig(max_files=2, cache_dir=str(root / "cache"), split=[1, 0]),
                 train=TrainConfig(steps=1, micro_batch_size=1, global_batch_size=1, seq_length=16, log_interval=100))
    train(cfg.validate(1), root / "run")
    native_cfg = ModelConfig(name="native", **MODEL)
    gen = torch.Generator().manual_seed(0)
    save_native({k: torch.randn(s, generator=gen) for k, s in expected_native_shapes(native_cfg).items()},
                native_cfg, root / "native")
    return {"training": root / "run" / "checkpoints", "native": root / "native"}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return make_checkpoints(tmp_path_factory.mktemp("pristine"))


def copy_of(src: Path, dst: Path) -> Path:
    subprocess.run(["cp", "-a", str(src), str(dst)], check=True)
    return dst


def snapshot(root: Path) -> dict[str, str]:
    """Every file under root with a hash of its bytes, to show nothing changed."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def weight_shard(ckpt: Path) -> Path:
    """The checkpoint's largest model/ shard (follows `latest`)."""
    if (ckpt / "latest").is_file():
        ckpt = ckpt / (ckpt / "latest").read_text().strip()
    return max((ckpt / "model").glob("*.distcp"), key=lambda p: p.stat().st_size)


def delete(path: Path) -> None:
    path.unlink()


def truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size - 7)


def flip_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10  # inside a tensor's bytes: the same size, other values
    path.write_bytes(bytes(data))


FAULTS = {"deleted": (delete, "missing"), "truncated": (truncate, "bytes"), "bit-flipped": (flip_bit, "checksum")}
TOOLS = {"convert": lambda i, o, *extra: convert(["native-to-hf", "--input", str(i), "--output", str(o),
                                                  "--no-tokenizer", *extra]),
         "upcycle": lambda i, o, *extra: upcycle(["--input", str(i), "--output", str(o), *UPCYCLE, *extra])}


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("kind", ["training", "native"])
@pytest.mark.parametrize("tool", TOOLS)
def test_damaged_shard_is_one_line_and_exit_2(tmp_path, capsys, pristine, tool, kind, fault):
    ckpt = copy_of(pristine[kind], tmp_path / "in")
    shard = weight_shard(ckpt)
    damage, needle = FAULTS[fault]
    damage(shard)
    before = snapshot(tmp_path)
    out = tmp_path / "out"
    assert TOOLS[tool](ckpt, out) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert shard.name in err and needle in err, err
    assert not out.exists() and snapshot(tmp_path) == before  # input as it was, no temporary left behind


@pytest.mark.parametrize("tool", TOOLS)
def test_existing_output_survives_a_damaged_input_with_overwrite(tmp_path, capsys, pristine, tool):
    ckpt = copy_of(pristine["training"], tmp_path / "in")
    delete(weight_shard(ckpt))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert TOOLS[tool](ckpt, out, "--overwrite") == EXIT_CONFIG
    assert "missing" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"] and (out / "keep.txt").read_text() == "mine"


SCRIPTS = {"convert": ["tools/convert_checkpoint.py", "native-to-hf"],  # with the run's tokenizer
           "upcycle": ["tools/upcycle.py", *UPCYCLE]}


@pytest.mark.parametrize("tool", SCRIPTS)
def test_command_line_fault_exits_2_without_traceback(tmp_path, pristine, tool):
    ckpt = copy_of(pristine["training"], tmp_path / "in")
    shard = weight_shard(ckpt)
    delete(shard)
    script, *args = SCRIPTS[tool]
    result = subprocess.run([sys.executable, str(ROOT / script), *args, "--input", str(ckpt),
                             "--output", str(tmp_path / "out")], capture_output=True, text=True)
    assert result.returncode == EXIT_CONFIG, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr
    assert shard.name in result.stderr and not (tmp_path / "out").exists()


BAD_FLAGS = {"convert": (["--max-shard-size", "5XB"], "'5XB'"), "upcycle": (["--top-k", "two"], "'two'")}


@pytest.mark.parametrize("tool", TOOLS)
def test_bad_flags_and_missing_input_are_one_line(tmp_path, capsys, pristine, tool):
    base = ["native-to-hf", "--no-tokenizer"] if tool == "convert" else UPCYCLE
    run = convert if tool == "convert" else upcycle
    given = ["--input", str(pristine["native"]), "--output", str(tmp_path / "out")]
    for argv, needle in [(given[:2], "--output"), (given + ["--bogus"], "--bogus"), (given + BAD_FLAGS[tool][0],
                                                                                    BAD_FLAGS[tool][1])]:
        with pytest.raises(SystemExit) as exit_info:
            run(base + argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == EXIT_CONFIG and err.count("\n") == 1 and needle in err, err
    assert TOOLS[tool](tmp_path / "nowhere", tmp_path / "out") == EXIT_CONFIG
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"input {tmp_path / 'nowhere'} does not exist" in err, err
    assert not (tmp_path / "out").exists()


def test_upcycle_refuses_what_cannot_fit_before_allocating(tmp_path, pristine):
    """10^9 experts would need petabytes: refused from the estimate, in a process that stays small."""
    code = ("import sys\n"
            "from megatron_qwen2.checkpoint.upcycle import main\n"
            "from tests.faults.test_tool_faults import peak_rss\n"
            "rc = main(sys.argv[1:])\n"
            "print(peak_rss(), file=sys.stderr)\n"
            "sys.exit(rc)\n")
    argv = ["--input", str(pristine["native"]), "--output", str(tmp_path / "moe"), "--num-experts", str(10**9),
            "--top-k", "2", "--expert-ffn-size", "16", "--shared-expert-ffn-size", "0"]
    result = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=ROOT)
    error, peak = result.stderr.splitlines()
    assert result.returncode == EXIT_CONFIG, result.stderr
    assert error.startswith("error: upcycling to 1000000000 experts") and "host memory" in error, error
    assert " TB of host memory" in error and "available" in error, error
    assert int(peak) < 2 * 10**9 and not (tmp_path / "moe").exists()


def test_check_fits_names_the_numbers(pristine):
    args = UpcycleArgs(num_experts=4, top_k=2, expert_ffn_size=16, shared_expert_ffn_size=0)
    cost = estimate_upcycle(stored_tensors(pristine["native"]), load_model_config(pristine["native"]), args)
    roomy = HostResources(10**12, Path("/data"), 10**12, "MemAvailable in /proc/meminfo")
    check_fits(cost, roomy, args)
    with pytest.raises(ConfigError, match=r"host memory .* but 1.0 MB is available \(MemAvailable in /proc/meminfo\)"):
        check_fits(cost, HostResources(10**12, Path("/data"), 10**6, "MemAvailable in /proc/meminfo"), args)
    with pytest.raises(ConfigError, match=r"writes about .* MB, but the file system of /data has 1.0 MB free"):
        check_fits(cost, HostResources(10**6, Path("/data"), 10**12, "x"), args)


def peak_rss() -> int:
    """This process's peak resident memory in bytes: VmHWM, which (unlike getrusage's ru_maxrss, kept
    across exec) starts afresh in a new program."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


PEAK = """
import json, os, sys
from megatron_qwen2.checkpoint.upcycle import main
from tests.faults.test_tool_faults import peak_rss
before = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
rc = main(sys.argv[1:])
print(json.dumps({"rc": rc, "peak": peak_rss() - before}))
"""


def test_upcycle_estimate_is_close_to_the_measured_peak(tmp_path):
    """Dense 10 MB -> 32 experts of 512 (110 MB written): estimate >= measured peak, and within 25 %."""
    dense = ModelConfig(name="dense", hidden_size=256, num_layers=2, num_attention_heads=4, num_kv_heads=2,
                        ffn_hidden_size=1024, vocab_size=1024)
    gen = torch.Generator().manual_seed(0)
    save_native({k: torch.randn(s, generator=gen) for k, s in expected_native_shapes(dense).items()}, dense,
                tmp_path / "dense")
    args = UpcycleArgs(num_experts=32, top_k=2, expert_ffn_size=512, shared_expert_ffn_size=1024, reinit_fraction=0)
    argv = ["--input", str(tmp_path / "dense"), "--output", str(tmp_path / "moe"), "--num-experts", "32",
            "--top-k", "2", "--expert-ffn-size", "512", "--shared-expert-ffn-size", "1024", "--reinit-fraction", "0",
            "--no-progress"]
    result = subprocess.run([sys.executable, "-c", PEAK, *argv], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    measured = json.loads(result.stdout.splitlines()[-1])["peak"]
    cost = estimate_upcycle(stored_tensors(tmp_path / "dense"), dense, args)
    written = sum(p.stat().st_size for p in (tmp_path / "moe").rglob("*") if p.is_file())
    assert measured <= cost.peak_memory_bytes <= 1.25 * measured, (measured, cost)
    assert written <= cost.disk_bytes <= 1.01 * written + 2**20, (written, cost)
