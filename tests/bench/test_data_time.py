"""The data-time benchmark runs at a tiny size and writes every figure it promises."""

import json
import math

from bench import data_time


def _times(row):
    for key in ("mean_s", "median_s", "min_s", "max_s"):
        assert math.isfinite(row[key]) and row[key] >= 0, (key, row)
    assert row["min_s"] <= row["median_s"] <= row["max_s"]


def test_tiny_run_writes_before_after_and_exposed_figures(tmp_path):
    out = tmp_path / "data_time.json"
    argv = ["--gbs", "8", "--seq", "64", "--dp", "1", "4", "--dp-rank", "5", "--tokens-per-prefix", "300",
            "--steps", "3", "--prefetch-steps", "3", "--step-time", "0.01", "--dir", str(tmp_path), "--out", str(out)]
    assert data_time.main(argv) == 0
    res = json.loads(out.read_text())
    assert res["device"].startswith("CPU: ") and res["device"].endswith(" cores")
    assert res["commit"] and res["date"]
    assert res["command"] == "python bench/data_time.py " + " ".join(argv)
    cfg = res["config"]
    assert (cfg["global_batch_size"], cfg["seq_length"], cfg["format"]) == (8, 64, "pretrain")
    assert cfg["reset_position_ids"] and cfg["reset_attention_mask"] and cfg["eod_mask_loss"]
    # 2 x 300 tokens hold 8 samples of 64 tokens: the 24 samples read span several epochs.
    assert cfg["epochs_read"] > 1 and any("across epochs" in note for note in res["notes"])
    for key, dp, rank in (("dp1", 1, 0), ("dp4_one_rank", 4, 1)):
        before, after, exposed = res["before"][key], res["after"][key], res["exposed"][key]
        for row in (before, after):
            _times(row)
            assert (row["dp"], row["dp_rank"], row["steps"], row["rows_kept"]) == (dp, rank, 3, 8 // dp)
        assert (before["rows_read"], after["rows_read"]) == (8, 8 // dp)
        assert res["after_speedup_median"][key] > 0
        for row in (exposed["all_steps"], exposed["after_the_first"], exposed["free_previous_batch"]):
            _times(row)
        assert exposed["all_steps"]["steps"] == 3 and exposed["step_time_s"] == 0.01
        assert exposed["first_step_wait_s"] >= 0
