"""MoE token permutation doors (custom ops megatron_qwen2::permute / ::unpermute on CUDA when built).

Usage in an MoE layer (tokens x [T, h], router output experts [T, k] and weights [T, k])::

    permuted, row_map, tokens_per_expert = ops.permute(x, experts, num_experts)
    # permuted [T*k, h]: rows grouped by expert (expert 0's rows first), within an expert by token
    # then by choice j; tokens_per_expert [E] int64 sizes the grouped GEMM / all-to-all splits.
    expert_out = run_experts(permuted, tokens_per_expert)           # [T*k, h'], same row order
    y = ops.unpermute(expert_out, row_map, weights)                 # [T, h']
    # y[t] = sum_j weights[t, j] * expert_out[row_map[t, j]], summed in fp32, one rounding

Both are deterministic (a stable sort, and per-token gathers and sums in a fixed order; no
atomics) and differentiable: permute w.r.t. x, unpermute w.r.t. expert_out and the weights.
"""

from __future__ import annotations

import torch

from megatron_qwen2.ops import extension, library, reference


def permute(x: torch.Tensor, routing_map: torch.Tensor, num_experts: int,
            multiple: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [T, h], routing_map [T, k] expert ids -> (permuted [R, h], row_map [T, k] int32, tokens_per_expert [E] int64).

    permuted[row_map[t, j]] = x[t]; the rows are sorted by expert (stable: by token, then j, within
    one expert). Experts that receive no token have a count of 0. With multiple > 1 each expert's
    group is padded with zero rows to a multiple of `multiple` rows (the layout FP8 grouped GEMMs
    take): tokens_per_expert holds the padded sizes and R their sum (else R = T*k).
    """
    if x.dim() != 2:
        raise ValueError(f"x must be [tokens, hidden], got shape {tuple(x.shape)}")
    if routing_map.dim() != 2 or routing_map.shape[0] != x.shape[0]:
        raise ValueError(f"routing_map must be [tokens={x.shape[0]}, k], got shape {tuple(routing_map.shape)}")
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")
    k = routing_map.shape[1]
    if (extension.use_kernel(x) and routing_map.is_cuda and k > 0 and num_experts > 0
            and routing_map.dtype in (torch.int32, torch.int64)):
        row_map, counts = library.expert_rows(routing_map, num_experts)
        row_map, groups = _padded_groups(row_map.view(routing_map.shape), counts, routing_map, multiple)
        routed, rows = torch.stack([counts.sum(), groups.sum()]).tolist()  # one sync
        if routed != routing_map.numel():  # ids outside [0, E) are counted by no expert
            reference.permute_indices(routing_map, num_experts)  # raises the ValueError naming them
        return library.permute(x.contiguous(), row_map.reshape(-1), k, rows), row_map, groups
    order, row_map, counts = reference.permute_indices(routing_map, num_experts)
    if multiple == 1:
        return x[order // max(k, 1)], row_map, counts
    row_map, groups = _padded_groups(row_map, counts, routing_map, multiple)
    permuted = x.new_zeros(int(groups.sum()), x.shape[1]).index_copy(0, row_map.reshape(-1).long(),
                                                                      x.repeat_interleave(k, dim=0))
    return permuted, row_map, groups


def _padded_groups(row_map: torch.Tensor, counts: torch.Tensor, routing_map: torch.Tensor,
                   multiple: int) -> tuple[torch.Tensor, torch.Tensor]:
    """row_map moved into each expert's group padded to a multiple of `multiple` rows, and the
    padded group sizes."""
    if multiple == 1:
        return row_map, counts
    groups = (counts + multiple - 1) // multiple * multiple
    # each group's first row among the padded rows less its first row among the unpadded ones
    shift = (groups.cumsum(0) - groups) - (counts.cumsum(0) - counts)
    return row_map + shift[routing_map.long()].to(row_map.dtype), groups


def unpermute(expert_out: torch.Tensor, row_map: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """expert_out [R, h] (R >= T*k), row_map [T, k] (from permute), probs [T, k] -> [T, h] in expert_out's dtype.

    out[t] = sum_j probs[t, j] * expert_out[row_map[t, j]], accumulated in fp32.
    """
    if row_map.dim() != 2 or probs.shape != row_map.shape:
        raise ValueError(f"probs {tuple(probs.shape)} and row_map {tuple(row_map.shape)} must both be [tokens, k]")
    if expert_out.dim() != 2 or expert_out.shape[0] < row_map.numel():
        raise ValueError(f"expert_out must be [at least tokens * k = {row_map.numel()}, hidden], "
                         f"got shape {tuple(expert_out.shape)}")
    if extension.use_kernel(expert_out) and probs.is_cuda and row_map.shape[1] > 0:
        p32 = probs.float().contiguous()
        out = library.unpermute(expert_out.contiguous(), row_map.reshape(-1).to(torch.int32).contiguous(), p32)
        return out
    return reference.unpermute(expert_out, row_map, probs)
