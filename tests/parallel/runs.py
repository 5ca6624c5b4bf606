"""A finished training run's logged metrics and final weights, and their comparison with a reference run."""

import json

import pytest
import torch

from megatron_qwen2.checkpoint import load_native_state


def read_run(run_dir):
    """(metrics.jsonl rows, the final checkpoint's weights by global name) of a run directory."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    state, _ = load_native_state(run_dir / "checkpoints")
    return rows, state


def assert_same_training(rows, state, ref_rows, ref_state, steps: int, moe_load: bool = False) -> None:
    """Every step's loss (1e-5), grad norm (1e-4) and MoE aux loss, optionally the expert load, and the
    final weights match the reference run's."""
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    for r, ref in zip(rows, ref_rows):
        assert r["loss"] == pytest.approx(ref["loss"], rel=1e-5), r["step"]
        assert r["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-4), r["step"]
        if "aux_loss" in ref:
            assert r["aux_loss"] == pytest.approx(ref["aux_loss"], rel=1e-5), r["step"]
            if moe_load:
                assert r["moe_load"] == ref["moe_load"], r["step"]
    assert state.keys() == ref_state.keys()
    for name in ref_state:
        torch.testing.assert_close(state[name], ref_state[name], rtol=1e-4, atol=1e-5, msg=name)
