"""Qwen2-MoE sparse block: fp32 softmax router, top-k experts, sigmoid-gated shared expert."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from megatron_qwen2 import ops
from megatron_qwen2.config import ModelConfig
from megatron_qwen2.model.mlp import MLP
from megatron_qwen2.parallel.mappings import gather_from_sp, scatter_to_sp
from megatron_qwen2.parallel.topology import Topology


def load_balancing_loss(router_sums: torch.Tensor, num_tokens: int, num_experts: int) -> torch.Tensor:
    """Switch-style aux loss exactly as HF `load_balancing_loss_func` computes it.

    router_sums [2, E]: top-k assignment counts and router probabilities, each summed over all
    MoE layers and tokens (num_tokens = tokens x MoE layers). loss = E * sum_e f_e * P_e with
    f_e = count_e / N and P_e = prob_sum_e / N. Because the sums run over layers before the
    product, pipeline stages pass the running sums along with the hidden states.
    """
    f = router_sums[0].detach() / num_tokens
    p = router_sums[1] / num_tokens
    return num_experts * torch.sum(f * p)


class Router(nn.Module):
    """Linear scores -> softmax in fp32 -> top-k (renormalised only if norm_topk_prob)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k = cfg.moe_top_k
        self.norm_topk_prob = cfg.norm_topk_prob
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.hidden_size))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [t, h] -> top-k weights [t, k] (x's dtype), expert ids [t, k], sums [2, E] (counts, probs)."""
        logits = F.linear(x, self.weight)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        counts = torch.bincount(experts.reshape(-1), minlength=probs.shape[-1]).to(torch.float32)
        return weights.to(x.dtype), experts, torch.stack([counts, probs.sum(0)])


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

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [s, b, h] ([s/tp, b, h] with sequence parallelism) -> same shape, router sums [2, E]."""
        x = gather_from_sp(x, self.sp_group, grad_is_partial=False)
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        weights, experts, sums = self.router(tokens)
        out = self.experts(tokens, weights, experts)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(tokens)) * self.shared_expert(tokens)
        return scatter_to_sp(out.view(shape), self.sp_group), sums
