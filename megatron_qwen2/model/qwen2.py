"""The Qwen2 decoder: embedding -> layers -> final norm -> head.

Activations flow as [s, b, h] (sequence first, as Megatron) so that sequence and context
parallelism cut the leading dimension; the public forward takes and returns batch-first.
Layers are keyed by their global index, so a parameter's name is the same in every layout.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from megatron_qwen2.config import ModelConfig
from megatron_qwen2.model.attention import SelfAttention
from megatron_qwen2.model.mlp import MLP
from megatron_qwen2.model.moe import MoEBlock, RouterStats, load_balancing_loss
from megatron_qwen2.model.norm import RMSNorm
from megatron_qwen2.model.rope import RotaryEmbedding
from megatron_qwen2.parallel.cross_entropy import vocab_parallel_cross_entropy
from megatron_qwen2.parallel.layers import ColumnParallelLinear, VocabParallelEmbedding, global_shape, local_shard
from megatron_qwen2.parallel.mappings import copy_to_tp, gather_from_sp, gather_from_tp
from megatron_qwen2.parallel.topology import Topology


@dataclass
class LossOutput:
    token_loss: torch.Tensor  # [b, s] fp32 cross-entropy per token
    aux_loss: Optional[torch.Tensor]  # MoE load-balancing loss (unscaled), None for dense models


class DecoderLayer(nn.Module):
    """x + attn(norm(x)), then h + mlp(norm(h)); the MLP is dense or MoE by layer index."""

    def __init__(self, cfg: ModelConfig, topo: Topology, layer_idx: int):
        super().__init__()
        sp = topo.sequence_parallel
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, sequence_parallel=sp)
        self.attention = SelfAttention(cfg, topo)
        self.post_attention_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, sequence_parallel=sp)
        self.is_moe = cfg.is_moe_layer(layer_idx)
        if self.is_moe:
            self.mlp = MoEBlock(cfg, topo)
        else:
            self.mlp = MLP(cfg.hidden_size, cfg.ffn_hidden_size, topo.group("tp"), sequence_parallel=sp)

    def forward(self, x, cos, sin) -> tuple[torch.Tensor, Optional[RouterStats]]:
        x = x + self.attention(self.input_norm(x), cos, sin)
        if self.is_moe:
            y, stats = self.mlp(self.post_attention_norm(x))
            return x + y, stats
        return x + self.mlp(self.post_attention_norm(x)), None


class Qwen2Model(nn.Module):
    """Qwen2 / Qwen2-MoE causal language model."""

    def __init__(self, cfg: ModelConfig, topo: Optional[Topology] = None):
        super().__init__()
        cfg.validate()
        topo = topo or Topology.single()
        self.cfg, self.topo = cfg, topo
        self.tp_group = topo.group("tp")
        sp = self.sequence_parallel = topo.sequence_parallel and self.tp_group is not None
        self.embedding = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, self.tp_group, sequence_parallel=sp)
        self.rotary = RotaryEmbedding(cfg)
        self.layers = nn.ModuleDict({str(i): DecoderLayer(cfg, topo, i) for i in range(cfg.num_layers)})
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, sequence_parallel=sp)
        if cfg.tie_word_embeddings:
            self.output = None
        else:
            self.output = ColumnParallelLinear(cfg.hidden_size, cfg.vocab_size, bias=False, group=self.tp_group,
                                               sequence_parallel=sp)
        self.init_weights(seed=0)

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Initialise every parameter as a function of (seed, its global name) only.

        The full tensor is drawn and this rank keeps its shard, so every parallel layout
        starts from the same model. Matrices ~ N(0, init_std), biases 0, norm scales 1.
        """
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                # Drawn on the parameter's device: the same seed gives the same model on every
                # rank of that device type, whatever the layout.
                gen = torch.Generator(device=p.device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
                full = torch.empty(global_shape(p, self.topo.tp), device=p.device).normal_(
                    0.0, self.cfg.init_std, generator=gen)
                p.copy_(local_shard(p, full, self.topo.tp, self.topo.tp_rank))

    def forward(self, input_ids: torch.Tensor, position_ids: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None):
        """input_ids [b, s] -> logits [b, s, vocab]; with labels [b, s] -> LossOutput."""
        b, s = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(s, device=input_ids.device).expand(b, s)
        h = self.embedding(input_ids.t())  # [s, b, h] ([s/tp, b, h] with sequence parallelism)
        cos, sin = self.rotary(position_ids.t(), h.dtype)
        stats: list[RouterStats] = []
        for layer in self.layers.values():
            h, st = layer(h, cos, sin)
            if st is not None:
                stats.append(st)
        h = self.final_norm(h)
        if self.output is None:  # tied: the (vocab-parallel) embedding table is the head
            h = gather_from_sp(h, self.tp_group) if self.sequence_parallel else copy_to_tp(h, self.tp_group)
            logits = F.linear(h, self.embedding.weight)
        else:
            logits = self.output(h)  # [s, b, V/tp]
        if labels is None:
            return gather_from_tp(logits, self.tp_group).transpose(0, 1)
        token_loss = vocab_parallel_cross_entropy(logits, labels.t(), self.tp_group).t()
        aux = load_balancing_loss(stats, self.cfg.num_experts) if stats else None
        return LossOutput(token_loss=token_loss, aux_loss=aux)
