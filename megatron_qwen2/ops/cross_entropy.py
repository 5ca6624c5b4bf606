"""Cross-entropy door over (vocabulary-parallel) logits: the full logits are never gathered.

The kernel path is fused with the softmax and never makes an fp32 copy of the logits: the forward
reads them once (row max, sum of exponentials, target logit over this rank's vocabulary shard),
the tensor-parallel all-reduces of those [tokens] statistics run here in Python, and the backward
reads the logits once more and writes the gradient in the logits' dtype. Without the kernel, the
tensor-parallel form runs the same reductions in PyTorch on an fp32 copy of the shard.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_qwen2.ops import extension, library, reference


class _FusedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, group):
        n, v_local = logits.shape
        start = dist.get_rank(group) * v_local if group is not None else 0
        local = labels - start
        target = torch.where((local >= 0) & (local < v_local), local, torch.full_like(local, -1)).contiguous()
        row_max, row_sum, tgt = library.cross_entropy_stats(logits, target)
        if group is not None:
            global_max = row_max.clone()
            dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
            row_sum = row_sum * torch.exp(row_max - global_max)
            dist.all_reduce(row_sum, group=group)
            dist.all_reduce(tgt, group=group)
            row_max = global_max
        lse = row_max + torch.log(row_sum)
        ctx.save_for_backward(logits, target, lse)
        return lse - tgt

    @staticmethod
    def backward(ctx, grad):
        logits, target, lse = ctx.saved_tensors
        return library.cross_entropy_backward(logits, target, lse, grad.float().contiguous()), None, None


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """The PyTorch form over a vocabulary shard, for logits the kernel does not take."""

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


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor,
                  group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """Per-token loss [...] in fp32 from logits [..., V / tp] and labels [...] (global vocabulary ids).

    With `group`, each rank holds vocabulary rows [rank * V/tp, (rank + 1) * V/tp) of the logits
    (Megatron's vocab-parallel layout); without it the logits hold the whole vocabulary.
    The logits' gradient has the logits' dtype.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"labels have shape {tuple(labels.shape)}, expected logits' leading {tuple(logits.shape[:-1])}")
    if extension.use_kernel(logits) and labels.is_cuda and logits.shape[-1] > 0 and logits.numel() > 0:
        flat = logits.reshape(-1, logits.shape[-1]).contiguous()
        loss = _FusedCrossEntropy.apply(flat, labels.reshape(-1).long(), group)
        return loss.view(labels.shape)
    if group is None:
        return reference.cross_entropy(logits, labels)
    return _VocabParallelCrossEntropy.apply(logits.float(), labels, group)
