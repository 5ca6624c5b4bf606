"""Model FLOPs of a training step, the numerator of MFU (no recomputation counted)."""

from __future__ import annotations

from megatron_qwen2.config import ModelConfig


def training_flops_per_token(cfg: ModelConfig, seq_length: int) -> float:
    """Forward + backward (3x forward) matmul FLOPs per token, with causal attention.

    Per layer: QKV, output projection, and the MLP (dense FFN, or top-k routed experts plus
    the shared expert for an MoE layer), plus attention scores and values over half the
    sequence on average; then the vocabulary head.
    """
    h, d = cfg.hidden_size, cfg.kv_channels
    nq, nkv = cfg.num_attention_heads, cfg.num_kv_heads
    attn = 2 * (h * (nq + 2 * nkv) * d + nq * d * h) + 2 * nq * d * seq_length  # causal: half of 4 s nq d
    total = 0.0
    for i in range(cfg.num_layers):
        if cfg.is_moe_layer(i):
            mlp = 2 * 3 * h * (cfg.moe_top_k * cfg.moe_ffn_hidden_size + cfg.shared_expert_ffn_hidden_size)
            mlp += 2 * h * cfg.num_experts  # router
        else:
            mlp = 2 * 3 * h * cfg.ffn_hidden_size
        total += attn + mlp
    return 3 * (total + 2 * h * cfg.vocab_size)
