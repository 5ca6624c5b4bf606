"""Cross-entropy over vocabulary-parallel logits: the full logits are never gathered."""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, group):
        # logits [..., V/tp] in fp32; this rank holds vocab rows [start, start + V/tp).
        v_local = logits.shape[-1]
        start = dist.get_rank(group) * v_local
        logits_max = logits.max(dim=-1).values
        dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - logits_max.unsqueeze(-1)
        local = labels - start
        outside = (local < 0) | (local >= v_local)
        local = local.masked_fill(outside, 0)
        target = shifted.gather(-1, local.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
        exp = shifted.exp()
        sum_exp = exp.sum(dim=-1)
        dist.all_reduce(target, group=group)
        dist.all_reduce(sum_exp, group=group)
        loss = sum_exp.log() - target
        ctx.save_for_backward(exp.div_(sum_exp.unsqueeze(-1)), local, outside)
        return loss

    @staticmethod
    def backward(ctx, grad):
        softmax, local, outside = ctx.saved_tensors
        onehot = F.one_hot(local, softmax.shape[-1]).to(softmax.dtype)
        onehot.masked_fill_(outside.unsqueeze(-1), 0.0)
        return (softmax - onehot) * grad.unsqueeze(-1), None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor,
                                 group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """Per-token loss [...] in fp32 from logits [..., V/tp] and labels [...] (global ids)."""
    logits = logits.float()
    if group is None:
        return F.cross_entropy(logits.flatten(0, -2), labels.flatten(), reduction="none").view(labels.shape)
    return _VocabParallelCrossEntropy.apply(logits, labels, group)
