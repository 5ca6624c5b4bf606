"""Cross-entropy door over (vocabulary-parallel) logits, fused with the softmax.

The kernel path never makes an fp32 copy of the logits: the forward reads them once (row max,
sum of exponentials, target logit over this rank's vocabulary shard), the tensor-parallel
all-reduces of those [tokens] statistics run here in Python, and the backward reads the logits
once more and writes the gradient in the logits' dtype.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

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
    from megatron_qwen2.parallel.cross_entropy import vocab_parallel_cross_entropy

    return vocab_parallel_cross_entropy(logits, labels, group)
