"""Model FLOPs of a training step, the numerator of MFU (no recomputation counted)."""

from __future__ import annotations

from megatron_qwen2.config import ModelConfig


def _projection_flops(cfg: ModelConfig, layer: int) -> float:
    """Forward matmul FLOPs per token of layer `layer`'s linear layers: QKV, the output projection
    and the MLP (dense FFN, or the top-k routed experts plus the shared expert)."""
    h, d = cfg.hidden_size, cfg.kv_channels
    nq, nkv = cfg.num_attention_heads, cfg.num_kv_heads
    attn = 2 * (h * (nq + 2 * nkv) * d + nq * d * h)
    if cfg.is_moe_layer(layer):
        return attn + 2 * 3 * h * (cfg.moe_top_k * cfg.moe_ffn_hidden_size + cfg.shared_expert_ffn_hidden_size)
    return attn + 2 * 3 * h * cfg.ffn_hidden_size


def training_flops_per_token(cfg: ModelConfig, seq_length: int) -> float:
    """Forward + backward (3x forward) matmul FLOPs per token, with causal attention.

    Per layer: QKV, output projection, and the MLP (dense FFN, or top-k routed experts plus
    the shared expert for an MoE layer, and its router), plus attention scores and values over
    half the sequence on average; then the vocabulary head.
    """
    h = cfg.hidden_size
    core = 2 * cfg.num_attention_heads * cfg.kv_channels * seq_length  # causal: half of 4 s nq d
    total = 0.0
    for i in range(cfg.num_layers):
        total += _projection_flops(cfg, i) + core + (2 * h * cfg.num_experts if cfg.is_moe_layer(i) else 0)
    return 3 * (total + 2 * h * cfg.vocab_size)


def fp8_flops_per_token(cfg: ModelConfig) -> float:
    """The part of `training_flops_per_token` that `train.fp8` runs in FP8: the linear layers of
    attention and the MLP or experts. The attention core, router and vocabulary head stay bf16."""
    return 3 * sum(_projection_flops(cfg, i) for i in range(cfg.num_layers))


def fp8_flop_share(cfg: ModelConfig, seq_length: int) -> float:
    """The share of a training step's FLOPs that `train.fp8` runs in FP8."""
    return fp8_flops_per_token(cfg) / training_flops_per_token(cfg, seq_length)


def speedup_of_share(share: float, rate: float) -> float:
    """A step's speed-up when `share` of it runs `rate` times faster and the rest takes as long."""
    return 1 / (1 - share + share / rate)
