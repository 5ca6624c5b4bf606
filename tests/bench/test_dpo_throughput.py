"""The DPO throughput harness runs on the CPU (tiny model, our step and the plain HF loop; TRL when
importable) and writes a complete result: each system's first loss is ln 2 (reference = policy)."""

import importlib.util
import json
import math

import pytest

from bench import dpo_throughput

pytest.importorskip("transformers")


@pytest.mark.parametrize("recompute,precompute", [("none", False), ("full", True)])
def test_cpu_run_writes_complete_result(tmp_path, recompute, precompute):
    out = tmp_path / "result.json"
    baselines = ["hf-loop"] + (["trl"] if importlib.util.find_spec("trl") else [])
    argv = ["--model", "tiny", "--layers", "1", "--device", "cpu", "--seq", "128", "--mbs", "2", "--gbs", "2", "--steps", "1",
            "--warmup", "1", "--pairs", "6", "--prompt-words", "3", "10", "--response-words", "3", "12",
            "--baseline", *baselines, "--recompute", recompute, "--out", str(out)]
    argv += ["--precompute-reference", "--profile"] if precompute else []
    assert dpo_throughput.main(argv) == 0
    res = json.loads(out.read_text())
    for key in ("device", "commit", "date", "command", "config", "results", "comparison"):
        assert key in res, key
    assert [r["system"] for r in res["results"]] == ["megatron_qwen2", *baselines]
    for row in res["results"]:
        assert math.isfinite(row["tokens_per_s"]) and row["tokens_per_s"] > 0, row["system"]
        assert row["loss_first"] == pytest.approx(math.log(2), abs=1e-3), row["system"]
        assert len(row["step_times_s"]) == 1
    assert set(res["comparison"]) == set(baselines)
    assert res["config"]["recompute"] == recompute and res["config"]["precompute_reference"] == precompute
    assert ("reference_pass_s" in res["results"][0]) == ("profile" in res["results"][0]) == precompute
    assert res["config"]["packed"]  # our rows of 129 tokens hold several of these short pairs
