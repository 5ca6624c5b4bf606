"""The FLOP counts against the parameters of a built model: the FP8 share is the linear layers'."""

import pytest

from megatron_qwen2.config import ModelConfig
from megatron_qwen2.model.flops import fp8_flops_per_token, training_flops_per_token
from megatron_qwen2.model.qwen2 import Qwen2Model

DENSE = dict(hidden_size=128, num_layers=2, num_attention_heads=4, num_kv_heads=2, ffn_hidden_size=320,
             vocab_size=512, tie_word_embeddings=False)
MOE = dict(DENSE, num_experts=8, moe_top_k=2, moe_ffn_hidden_size=96, shared_expert_ffn_hidden_size=160)
FP8_LINEARS = ("attention.qkv.weight", "attention.out.weight", "mlp.gate_up.weight", "mlp.down.weight",
               "shared_expert.gate_up.weight", "shared_expert.down.weight")


@pytest.mark.parametrize("arch", [DENSE, MOE], ids=["dense", "moe"])
def test_the_fp8_flops_are_six_per_parameter_of_the_linear_layers_a_token_passes(arch):
    cfg = ModelConfig(**arch)
    per_token = 0
    for name, p in Qwen2Model(cfg).named_parameters():
        if name.endswith(FP8_LINEARS):
            per_token += p.numel()
        elif name.endswith(("experts.gate_up_weight", "experts.down_weight")):
            per_token += p.numel() // cfg.num_experts * cfg.moe_top_k  # a token passes top-k experts
    assert fp8_flops_per_token(cfg) == 6 * per_token
    seq, head = 256, 6 * cfg.hidden_size * cfg.vocab_size
    core = 6 * cfg.num_attention_heads * cfg.kv_channels * seq * cfg.num_layers
    router = 6 * cfg.hidden_size * cfg.num_experts * cfg.num_layers
    assert training_flops_per_token(cfg, seq) == fp8_flops_per_token(cfg) + head + core + router
