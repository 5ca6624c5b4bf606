"""The Qwen2 decoder: embedding -> layers -> final norm -> head.

Activations flow as [s, b, h] (sequence first, as Megatron) so that sequence and context
parallelism cut the leading dimension; the public forward takes and returns batch-first.
Layers are keyed by their global index, so a parameter's name is the same in every layout.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from megatron_qwen2 import ops
from megatron_qwen2.config import ModelConfig
from megatron_qwen2.model.attention import SelfAttention
from megatron_qwen2.model.mlp import MLP
from megatron_qwen2.model.moe import MoEBlock, MoEStats, load_balancing_loss
from megatron_qwen2.model.norm import RMSNorm
from megatron_qwen2.model.rope import RotaryEmbedding
from megatron_qwen2.ops.fp8 import Fp8, fused_recipe
from megatron_qwen2.parallel.layers import ColumnParallelLinear, VocabParallelEmbedding
from megatron_qwen2.parallel.mappings import copy_to_tp, gather_from_sp, gather_from_tp
from megatron_qwen2.parallel.shard import shard_of
from megatron_qwen2.parallel.topology import Topology


@dataclass
class LossOutput:
    token_loss: torch.Tensor  # [b, s] fp32 cross-entropy per token
    aux_loss: Optional[torch.Tensor]  # MoE load-balancing loss (unscaled), None for dense models
    moe_stats: dict[int, MoEStats] = field(default_factory=dict)  # this chunk's MoE layers, by global index


class StageOutput(NamedTuple):
    """What a stage that is not the last passes on, and the statistics of its MoE layers."""

    hidden: torch.Tensor  # [s(/tp), b, h]
    router_sums: Optional[torch.Tensor]  # [2, E] running MoE router sums (None for a dense model)
    moe_stats: dict[int, MoEStats]  # this chunk's MoE layers, by global index


class DecoderLayer(nn.Module):
    """x + attn(norm(x)), then h + mlp(norm(h)); the MLP is dense or MoE by layer index."""

    def __init__(self, cfg: ModelConfig, topo: Topology, layer_idx: int, fp8: Optional[Fp8] = None):
        super().__init__()
        sp = topo.sequence_parallel
        self.is_moe = cfg.is_moe_layer(layer_idx)
        # A norm hands its output quantised to the FP8 projection it feeds (QKV; a dense MLP's gate |
        # up) unless sequence parallelism all-gathers it in between (docs/architecture.md, "FP8").
        fused = None if sp else fused_recipe(fp8)
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, sequence_parallel=sp, fp8_out=fused)
        self.attention = SelfAttention(cfg, topo, fp8)
        self.post_attention_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, sequence_parallel=sp,
                                           fp8_out=None if self.is_moe else fused)
        if self.is_moe:
            self.mlp = MoEBlock(cfg, topo, fp8)
        else:
            self.mlp = MLP(cfg.hidden_size, cfg.ffn_hidden_size, topo.groups.tp, sequence_parallel=sp, fp8=fp8)

    # Activation recomputation, set by Qwen2Model.set_recompute: None, "selective" (the attention
    # block's activations are recomputed in backward) or "full" (the whole layer's are). What the
    # recomputed forward returns is discarded by `checkpoint`: the statistics of the first count.
    recompute: Optional[str] = None

    def forward(self, *args, **kwargs) -> tuple[torch.Tensor, Optional[MoEStats]]:
        """-> new hidden states, and this layer's MoE statistics (None for a dense layer)."""
        if self.recompute == "full" and torch.is_grad_enabled():
            return checkpoint(self._forward, *args, use_reentrant=False, **kwargs)
        return self._forward(*args, **kwargs)

    def _attention_block(self, x, *args) -> torch.Tensor:
        if self.recompute == "selective" and torch.is_grad_enabled():
            return checkpoint(lambda x, *a: self.attention(self.input_norm(x), *a), x, *args, use_reentrant=False)
        return self.attention(self.input_norm(x), *args)

    def _forward(self, x, cos, sin, document_ids=None) -> tuple[torch.Tensor, Optional[MoEStats]]:
        normed, x = self.post_attention_norm.add_forward(self._attention_block(x, cos, sin, document_ids), x)
        if self.is_moe:
            y, stats = self.mlp(normed)
            return x + y, stats
        return x + self.mlp(normed), None


class Qwen2Model(nn.Module):
    """Qwen2 / Qwen2-MoE causal language model, or one pipeline stage of it.

    A stage holds the layers `layer_ids` (global indices; all by default), the embedding when it
    is the first stage (`pre_process`) and the final norm and head when it is the last
    (`post_process`). With tied embeddings a last stage that is not also first keeps its own copy
    of `embedding.weight` for the head; the pipeline keeps the copies equal by summing their
    gradients over the embedding group.

    `fp8`: the attention and MLP projections (routed experts included) run their GEMMs in FP8;
    embedding, head, router, norms and the attention core stay in the model's dtype.
    """

    def __init__(self, cfg: ModelConfig, topo: Optional[Topology] = None, layer_ids: Optional[Sequence[int]] = None,
                 pre_process: bool = True, post_process: bool = True, fp8: Optional[Fp8] = None):
        super().__init__()
        topo = topo or Topology.single()
        self.cfg, self.topo = cfg, topo
        self.pre_process, self.post_process = pre_process, post_process
        self.tp_group = topo.groups.tp.pg
        sp = self.sequence_parallel = topo.sequence_parallel
        if pre_process or (post_process and cfg.tie_word_embeddings):
            # On a last stage that is not first, the head's copy: its gradient joins the first
            # stage's, and the first stage's counts in the gradient norm and checkpoints.
            self.embedding = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, topo.groups.tp,
                                                    sequence_parallel=sp, tied_copy=not pre_process)
        self.rotary = RotaryEmbedding(cfg)
        layer_ids = range(cfg.num_layers) if layer_ids is None else layer_ids
        self.layers = nn.ModuleDict({str(i): DecoderLayer(cfg, topo, i, fp8) for i in layer_ids})
        # Tokens x MoE layers of the whole model, the denominator of the aux loss.
        self.num_moe_layers = sum(cfg.is_moe_layer(i) for i in range(cfg.num_layers))
        if post_process:
            self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, sequence_parallel=sp)
            self.output = None if cfg.tie_word_embeddings else ColumnParallelLinear(
                cfg.hidden_size, cfg.vocab_size, bias=False, group=topo.groups.tp, sequence_parallel=sp)
        self.init_weights(seed=0)

    def set_recompute(self, mode: str, num_layers: Optional[int] = None) -> None:
        """Recompute activations in backward (none | selective | full) for the first `num_layers`
        layers of this chunk (None: all); saves activation memory for one more forward."""
        for i, layer in enumerate(self.layers.values()):
            on = mode != "none" and (num_layers is None or i < num_layers)
            layer.recompute = mode if on else None

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Initialise every parameter as a function of (seed, its global name) only.

        The full tensor is drawn and this rank keeps its shard, so every parallel layout
        starts from the same model. Matrices ~ N(0, init_std), biases 0, norm scales 1. Parameters
        on the meta device (a model built for its shapes only, as the planner does) hold no values.
        """
        topo = self.topo
        for name, p in self.named_parameters():
            if p.is_meta:
                continue
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                # Drawn on the parameter's device: the same seed gives the same model on every
                # rank of that device type, whatever the layout.
                gen = torch.Generator(device=p.device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
                shard = shard_of(p)
                tensor = shard.tensor_group(topo.groups.tp, topo.groups.etp)
                shape = shard.global_shape(p.shape, tensor.size, topo.ep)
                full = torch.empty(shape, device=p.device).normal_(0.0, self.cfg.init_std, generator=gen)
                p.copy_(shard.local_part(full, tensor.size, tensor.rank, topo.ep, topo.ep_rank))

    def forward(self, input_ids: torch.Tensor, position_ids: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None, *, document_ids: Optional[torch.Tensor] = None):
        """input_ids [b, s] -> logits [b, s, vocab]; with labels [b, s] -> LossOutput."""
        if position_ids is None:
            b, s = input_ids.shape
            position_ids = torch.arange(s, device=input_ids.device).expand(b, s)
        return self.forward_stage(input_ids, position_ids, labels, document_ids=document_ids)

    def forward_stage(self, x: torch.Tensor, position_ids: torch.Tensor, labels: Optional[torch.Tensor] = None,
                      router_sums: Optional[torch.Tensor] = None, *, document_ids: Optional[torch.Tensor] = None):
        """Run this stage. x: input ids [b, s] on the first stage, else hidden states [s(/tp), b, h].

        router_sums [2, E]: the MoE router sums of the stages before (None on the first).
        document_ids [b, s]: row-local document of each position; attention stays inside a document.
        Returns a StageOutput on a stage that is not last; logits or LossOutput on the last. The
        MoE statistics of this forward come back in them, nothing is kept in the modules.
        """
        h = self.embedding(x.t()) if self.pre_process else x  # [s, b, h] ([s/tp, b, h] with sp)
        cos, sin = self.rotary(position_ids.t(), h.dtype)
        moe_stats: dict[int, MoEStats] = {}
        for i, layer in self.layers.items():
            h, stats = layer(h, cos, sin, document_ids)
            if stats is not None:
                moe_stats[int(i)] = stats
                sums = stats.router_sums
                router_sums = sums if router_sums is None else router_sums + sums
        if not self.post_process:
            if router_sums is None and self.num_moe_layers:  # no MoE layer yet: start the sums at zero
                router_sums = torch.zeros(2, self.cfg.num_experts, device=h.device)
            return StageOutput(h, router_sums, moe_stats)
        h = self.final_norm(h)
        if self.output is None:  # tied: the (vocab-parallel) embedding table is the head
            h = gather_from_sp(h, self.tp_group) if self.sequence_parallel else copy_to_tp(h, self.tp_group)
            logits = F.linear(h, self.embedding.weight)
        else:
            logits = self.output(h)  # [s, b, V/tp]
        if labels is None:
            return gather_from_tp(logits, self.tp_group).transpose(0, 1)
        token_loss = ops.cross_entropy(logits, labels.t(), self.tp_group).t()  # fused: no fp32 copy of the logits
        aux = None
        if self.num_moe_layers:
            aux = load_balancing_loss(router_sums, labels.numel() * self.num_moe_layers, self.cfg.num_experts)
        return LossOutput(token_loss=token_loss, aux_loss=aux, moe_stats=moe_stats)
