"""Qwen2-MoE sparse block: fp32 softmax router, top-k experts, sigmoid-gated shared expert."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from megatron_qwen2 import ops
from megatron_qwen2.config import ModelConfig
from megatron_qwen2.model.mlp import MLP
from megatron_qwen2.parallel.mappings import gather_from_sp, scatter_to_sp
from megatron_qwen2.parallel.topology import Topology


@dataclass
class RouterStats:
    """What one MoE layer contributes to the load-balancing loss."""

    tokens_per_expert: torch.Tensor  # [E] top-k assignment counts (no gradient)
    prob_sum: torch.Tensor  # [E] sum over tokens of the router probabilities (carries gradient)
    num_tokens: int


def load_balancing_loss(stats: list[RouterStats], num_experts: int) -> torch.Tensor:
    """Switch-style aux loss exactly as HF `load_balancing_loss_func` computes it.

    Counts and probabilities are summed over all MoE layers and tokens first, then
    loss = E * sum_e f_e * P_e with f_e = count_e / N and P_e = prob_sum_e / N.
    """
    n = sum(s.num_tokens for s in stats)
    f = torch.stack([s.tokens_per_expert for s in stats]).sum(0) / n
    p = torch.stack([s.prob_sum for s in stats]).sum(0) / n
    return num_experts * torch.sum(f * p)


class Router(nn.Module):
    """Linear scores -> softmax in fp32 -> top-k (renormalised only if norm_topk_prob)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k = cfg.moe_top_k
        self.norm_topk_prob = cfg.norm_topk_prob
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.hidden_size))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, RouterStats]:
        """x [t, h] -> top-k weights [t, k] (x's dtype), expert ids [t, k], stats."""
        logits = F.linear(x, self.weight)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        counts = torch.bincount(experts.reshape(-1), minlength=probs.shape[-1]).to(torch.float32)
        stats = RouterStats(tokens_per_expert=counts, prob_sum=probs.sum(0), num_tokens=x.shape[0])
        return weights.to(x.dtype), experts, stats


class Experts(nn.Module):
    """All routed experts' weights as 3D tensors; tokens are grouped by expert, never looped."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        e, h, f = cfg.num_experts, cfg.hidden_size, cfg.moe_ffn_hidden_size
        self.gate_up_weight = nn.Parameter(torch.empty(e, 2 * f, h))  # per expert [gate | up] rows
        self.down_weight = nn.Parameter(torch.empty(e, h, f))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """x [t, h], weights/experts [t, k] -> sum_k weights * expert_k(x)  [t, h]."""
        t, k = experts.shape
        flat = experts.reshape(-1)
        order = torch.argsort(flat, stable=True)  # token copies grouped by expert
        token_of = order // k
        counts = torch.bincount(flat, minlength=self.gate_up_weight.shape[0]).tolist()
        chunks = torch.split(x[token_of], counts)
        outs = [
            F.linear(ops.swiglu(F.linear(chunk, self.gate_up_weight[i])), self.down_weight[i])
            for i, chunk in enumerate(chunks) if chunk.shape[0] > 0
        ]
        y = torch.cat(outs) * weights.reshape(-1)[order].unsqueeze(-1)
        return torch.zeros_like(x).index_add_(0, token_of, y.to(x.dtype))


class MoEBlock(nn.Module):
    """out = sum_k w_k expert_k(x) + sigmoid(shared_expert_gate(x)) * shared_expert(x).

    Router, gate and routed experts are replicated over tp and see every token: under
    sequence parallelism the block gathers the sequence on entry (its backward only splits,
    since every rank computes the same thing) and keeps its own shard on exit.
    """

    def __init__(self, cfg: ModelConfig, topo: Topology):
        super().__init__()
        self.sp_group = topo.group("tp") if topo.sequence_parallel else None
        self.router = Router(cfg)
        self.experts = Experts(cfg)
        if cfg.shared_expert_ffn_hidden_size > 0:
            self.shared_expert = MLP(cfg.hidden_size, cfg.shared_expert_ffn_hidden_size, topo.group("tp"))
            self.shared_expert_gate = nn.Linear(cfg.hidden_size, 1, bias=False)
        else:
            self.shared_expert = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, RouterStats]:
        """x [s, b, h] ([s/tp, b, h] with sequence parallelism) -> same shape, router stats."""
        x = gather_from_sp(x, self.sp_group, grad_is_partial=False)
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        weights, experts, stats = self.router(tokens)
        out = self.experts(tokens, weights, experts)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(tokens)) * self.shared_expert(tokens)
        return scatter_to_sp(out.view(shape), self.sp_group), stats
