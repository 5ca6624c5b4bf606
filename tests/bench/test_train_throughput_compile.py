"""`bench/train_throughput.py --compile` on the CPU: the decoder layers of the tiny dense model compile
into one graph without graph breaks, and the run records that next to its throughput."""

import json

from bench import train_throughput


def test_compile_run_records_one_graph_and_no_breaks(tmp_path, monkeypatch):
    monkeypatch.setenv("MEGATRON_QWEN2_OPS", "auto")  # main() sets it for the run; restored afterwards
    out = tmp_path / "result.json"
    argv = ["--model", "tiny", "--device", "cpu", "--seq", "32", "--mbs", "2", "--gbs", "4", "--steps", "1",
            "--warmup", "1", "--compile", "--out", str(out)]
    assert train_throughput.main(argv) == 0
    ours = json.loads(out.read_text())["ours"]
    assert ours["compile"] is True
    assert ours["compiled_graphs"] == 1 and ours["graph_breaks"] == 0  # every layer reuses the one graph
    assert ours["tokens_per_s"] > 0
