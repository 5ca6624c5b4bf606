"""MoE load and z-loss statistics count each training forward once: a layer recomputed in
backward (train.recompute=full) logs what the same step logs without recomputation, and a
validation forward (no grad) adds nothing."""

import pytest
import torch

from megatron_qwen2.config import ModelConfig
from megatron_qwen2.model import Qwen2Model
from megatron_qwen2.model.moe import moe_load_stats

MOE = ModelConfig(hidden_size=64, num_layers=2, num_attention_heads=4, num_kv_heads=2, ffn_hidden_size=128,
                  vocab_size=300, num_experts=8, moe_top_k=2, moe_ffn_hidden_size=32,
                  shared_expert_ffn_hidden_size=48, moe_z_loss_coef=1e-3)


def _stats(recompute: str) -> dict:
    model = Qwen2Model(MOE)
    model.set_recompute(recompute)
    ids = torch.randint(0, MOE.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    for _ in range(2):  # two micro-batches
        out = model(ids[:, :-1], labels=ids[:, 1:])
        (out.token_loss.mean() + out.aux_loss).backward()
    with torch.no_grad():  # validation
        model(ids[:, :-1], labels=ids[:, 1:])
    return moe_load_stats([model], None)


@pytest.mark.parametrize("recompute", ["selective", "full"])
def test_recomputation_and_validation_do_not_count_twice(recompute):
    plain, recomputed = _stats("none"), _stats(recompute)
    tokens = 2 * 2 * 16 * MOE.moe_top_k  # routed slots: 2 micro-batches x 2 rows x 16 tokens x top-k
    for layer in plain["moe_load"].values():
        assert sum(layer["tokens_per_expert"]) == tokens
    assert recomputed["moe_load"] == plain["moe_load"]
    assert recomputed["moe_z_loss"] == pytest.approx(plain["moe_z_loss"], rel=1e-6)
