"""bench/fp8_numerics.py --merge: runs made in one process per recipe become one result file that
keeps where they were measured, compares each recipe with bf16 over the steps all runs made, and
refuses files of other settings or devices."""

import json

import pytest

from bench import fp8_numerics

MEASURED = {"device": "NVIDIA H100 80GB HBM3", "commit": "abc1234", "date": "2026-12-07T09:39:13+00:00",
            "torch": "2.11.0+cu130", "cuda": "13.0"}
CONFIG = {"steps": 200, "seq": 512, "mbs": 16, "gbs": 16, "lr": 3e-4, "max_files": 2000, "seed": 1234, "plot": None,
          "merge": None}


def part(tmp_path, fp8: str, losses: list[float], **changes) -> str:
    run = fp8_numerics.summary(fp8, losses, [1.0] * len(losses), 0, 10.0)
    payload = dict(MEASURED, config=dict(CONFIG, recipes=[fp8], out=f"/root/out/num_{fp8}.json"), runs=[run])
    payload.update(changes)
    path = tmp_path / f"num_{fp8}.json"
    path.write_text(json.dumps(payload))
    return str(path)


def test_merge_keeps_the_measuring_device_and_judges_each_recipe(tmp_path):
    files = [part(tmp_path, "tensorwise", [2.0] * 150 + [3.03] * 50),  # cut short: 200 steps against 250
             part(tmp_path, "none", [2.0] * 150 + [3.0] * 100),
             part(tmp_path, "blockwise", [2.0] * 150 + [3.0] * 99 + [3.1])]
    out = tmp_path / "merged.json"
    assert fp8_numerics.main(["--merge", str(out), *files]) == 0
    merged = json.loads(out.read_text())
    assert {k: merged[k] for k in MEASURED} == MEASURED
    runs = {r["fp8"]: r for r in merged["runs"]}
    assert merged["runs"][0]["fp8"] == "none" and all(r["steps"] == 200 for r in runs.values())
    assert runs["none"]["mean_loss_last_100"] == pytest.approx(2.5)
    assert runs["tensorwise"]["relative_to_bf16"] == pytest.approx(2.515 / 2.5 - 1)  # 0.6 %: beyond 0.5 %
    assert not runs["tensorwise"]["within_bound"]
    assert runs["blockwise"]["relative_to_bf16"] == pytest.approx(0.0) and runs["blockwise"]["within_bound"]


@pytest.mark.parametrize("changes", [{"device": "NVIDIA H200"}, {"config": dict(CONFIG, lr=1e-3, recipes=["none"])}])
def test_merge_refuses_files_of_other_settings_or_devices(tmp_path, changes):
    files = [part(tmp_path, "none", [2.0] * 10), part(tmp_path, "rowwise", [2.0] * 10, **changes)]
    with pytest.raises(SystemExit, match="different"):
        fp8_numerics.main(["--merge", str(tmp_path / "merged.json"), *files])
