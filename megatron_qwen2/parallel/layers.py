"""Tensor-parallel layers. Each says in its type how it splits and what it communicates.

Every parameter gets its `Shard` (parallel/shard.py) here, where it is made: the dimension cut
across tp ranks, or the explicit rows of a rank, so checkpointing can name the global tensor and
this rank's offset in it (docs/architecture.md, "Parameters and their shards"). The layers take
the tp `Group` (its size, this rank's place, the communicator).

With sequence parallelism the activations between tp regions are cut along the sequence
([s/tp, b, h]): a column-parallel layer all-gathers its input instead of copying it, and a
row-parallel layer (or the embedding) reduce-scatters its output instead of all-reducing it.
Parameters that then see only this rank's tokens (the row-parallel bias) have a Shard with
`grad_needs_tp_sum`: their gradients are summed over tp before the optimizer step.
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Optional, Sequence, Union

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from megatron_qwen2.ops.fp8 import (Fp8, Fp8Input, Fp8Tensor, add_weight_gemm, gemm, keep_t, pad_rows, quantize_input,
                                    quantize_pair, t_again, weight_gemm_slices)
from megatron_qwen2.parallel.mappings import (copy_to_tp, gather_from_sp, reduce_from_tp,
                                              reduce_scatter_to_sp)
from megatron_qwen2.parallel.shard import KvReplica, Shard, set_shard, shard_of
from megatron_qwen2.parallel.topology import Group


def _divide(n: int, d: int, what: str) -> int:
    if n % d != 0:
        raise ValueError(f"{what}={n} is not divisible by tp={d}")
    return n // d


def _param(shape: tuple[int, ...], shard: Shard) -> nn.Parameter:
    return set_shard(nn.Parameter(torch.empty(shape)), shard)


def gather_full(p: torch.Tensor, local: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """Reassemble the full tensor from every tp rank's shard `local` of parameter `p`."""
    shard = shard_of(p)
    if shard.tp_dim is None or group is None:
        return local
    n = dist.get_world_size(group)
    parts = [torch.empty_like(local) for _ in range(n)]
    dist.all_gather(parts, local.contiguous(), group=group)
    if shard.tp_rows is None:
        return torch.cat(parts, dim=shard.tp_dim)
    rows = torch.tensor(shard.tp_rows, device=local.device)
    all_rows = [torch.empty_like(rows) for _ in range(n)]
    dist.all_gather(all_rows, rows, group=group)
    full = local.new_empty(shard.global_shape(local.shape, n, 1))
    for r, part in zip(all_rows, parts):  # replicated rows are equal on every rank that holds them
        full.index_copy_(shard.tp_dim, r, part)
    return full


def _fuse_wgrad(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether weight's gradient can be added straight into its fp32 `main_grad` by the GEMM."""
    return (x.is_cuda and torch.is_grad_enabled() and weight.requires_grad and hasattr(weight, "main_grad")
            and os.environ.get("MEGATRON_QWEN2_WGRAD_FUSION", "1") != "0")


class _LinearMainGrad(torch.autograd.Function):
    """y = x W^T + b, whose backward accumulates dW = dy^T x into W.main_grad (fp32) inside the GEMM.

    The unfused path writes a bf16 dW and adds it to main_grad afterwards (12 bytes moved per
    parameter per micro-batch, and a bf16 rounding of dW). Autograd still gets a gradient for W,
    an uninitialised placeholder, so the gradient buffer's per-parameter hook fires in order; the
    flag `wgrad_in_main_grad` tells it the gradient is already in main_grad. `weight` is the
    parameter itself (any shape [..., in]); it is multiplied as [-1, in].

    The parameter is kept on ctx, not among the saved tensors: under activation recomputation
    (torch.utils.checkpoint) saved tensors come back as detached aliases, without main_grad. The
    FP8 functions (`_Fp8Linear`, model/moe.py's grouped one) keep it the same way.
    """

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x)
        ctx.weight, ctx.has_bias = weight, bias is not None
        return F.linear(x, weight.reshape(-1, weight.shape[-1]), bias)

    @staticmethod
    def backward(ctx, dy):
        (x,), weight = ctx.saved_tensors, ctx.weight
        w = weight.reshape(-1, weight.shape[-1])
        dx = dy.matmul(w) if ctx.needs_input_grad[0] else None
        dy2, x2 = dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1])
        main = weight.main_grad.view(w.shape)
        torch.addmm(main, dy2.t(), x2, out_dtype=torch.float32, out=main)
        weight.wgrad_in_main_grad = True
        db = dy2.sum(0) if ctx.has_bias else None
        return dx, torch.empty_like(weight), db


def add_weight_grad(weight: torch.Tensor, dyt: Fp8Tensor, xt: Fp8Tensor) -> torch.Tensor:
    """The gradient to hand autograd for `weight` viewed as [-1, in], given dy^T and x^T quantised
    along the tokens: added into main_grad by the GEMM where the gradient buffer gave it one
    (`add_weight_gemm`; a placeholder returned, as _LinearMainGrad does), else made in fp32 slices
    joined in the weight's dtype and shape."""
    if hasattr(weight, "main_grad"):
        add_weight_gemm(dyt, xt, weight.main_grad.view(-1, weight.shape[-1]))
        weight.wgrad_in_main_grad = True
        return torch.empty_like(weight)
    return torch.cat([dw for _, dw in weight_gemm_slices(dyt, xt)]).to(weight.dtype).view(weight.shape)


class _Fp8Linear(torch.autograd.Function):
    """y = x W^T + b with the forward, input-gradient and weight-gradient GEMMs in FP8 (ops/fp8.py).

    x comes as an `Fp8Input` (its quantisations along the features and along the tokens, the token
    rows padded with zeros to the recipe's multiple: the weight gradient reduces over them); `x` is its
    stand-in, whose gradient is the input gradient. W and W^T come from the model's `Fp8Weights`.
    Saved for backward: x^T quantised along the tokens (FP8, half the bytes of a bf16 x), or where the
    input says how to remake it (`Fp8Input.remake_t`) the tensor it is remade from.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, fp8: Fp8, xin: Fp8Input):
        rcp = fp8.recipe
        rows = x.numel() // x.shape[-1]
        w8 = fp8.weights.get(weight, rcp)
        y = gemm(xin.q, w8.w, x.dtype)[:rows]
        if bias is not None:
            y = y + bias
        saved, ctx.remake_t = keep_t(xin)
        ctx.save_for_backward(*saved)
        ctx.weight = weight  # the parameter, with its main_grad (see _LinearMainGrad)
        ctx.recipe, ctx.weight8, ctx.x_shape, ctx.has_bias = rcp, w8, x.shape, bias is not None
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        weight, rcp, rows = ctx.weight, ctx.recipe, dy.numel() // dy.shape[-1]
        xt = t_again(ctx.saved_tensors, ctx.remake_t, rcp.activation_tiling)
        dy2 = pad_rows(dy.reshape(rows, dy.shape[-1]), rcp.token_multiple)
        dyq, dyt = quantize_pair(dy2, rcp.activation_tiling, rcp.grad_dtype)
        dx = gemm(dyq, ctx.weight8.t(), dy.dtype)[:rows].view(ctx.x_shape) if ctx.needs_input_grad[0] else None
        dw = add_weight_grad(weight, dyt, xt)
        db = dy2.sum(0) if ctx.has_bias else None
        return dx, dw, db, None, None


def linear(x: Union[torch.Tensor, Fp8Input], weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
           fp8: Optional[Fp8] = None) -> torch.Tensor:
    """x [..., in] @ weight[-1, in]^T (+ bias): in FP8 when `fp8` is given (x a tensor, or already
    quantised as its `Fp8Input` by the op that made it), else in x's dtype with the weight gradient
    fused into main_grad on CUDA."""
    b = None if bias is None else bias.reshape(-1)
    if fp8 is not None:
        xin = x if isinstance(x, Fp8Input) else quantize_input(x, fp8.recipe)
        return _Fp8Linear.apply(xin.stand_in, weight, b, fp8, xin)
    if isinstance(x, Fp8Input):
        raise ValueError("an FP8-quantised input reached a linear layer without FP8")
    if _fuse_wgrad(x, weight):
        return _LinearMainGrad.apply(x, weight, b)
    return F.linear(x, weight.reshape(-1, weight.shape[-1]), b)


def _tp(group: Optional[Group]) -> Group:
    """The tp group of a layer (None: this rank alone)."""
    return Group("tp") if group is None else group


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W split along its output rows; the input is shared by all tp ranks.

    `stack` > 1 keeps several projections fused in one weight of shape
    [stack, out/tp, in] (e.g. SwiGLU's [gate | up]); each rank holds its slice of every
    one of them, and the output is laid out [..., stack * out/tp].

    `local_rows` (global output-row indices, stack 1 only) overrides the even split, for
    layouts where ranks hold uneven or overlapping rows (replicated kv heads); `kv_replica` names
    the local rows this rank shares with other tp ranks.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, group: Optional[Group] = None,
                 stack: int = 1, sequence_parallel: bool = False, local_rows: Optional[Sequence[int]] = None,
                 kv_replica: Optional[KvReplica] = None, fp8: Optional[Fp8] = None):
        super().__init__()
        tp = _tp(group)
        self.fp8 = fp8
        self.group = tp.pg
        self.sequence_parallel = sequence_parallel
        self.stack = stack
        if local_rows is not None:
            assert stack == 1, "explicit local rows are for unstacked weights"
            out_local = len(local_rows)
            shard = Shard(tp_dim=0, tp_rows=tuple(local_rows), tp_dim_size=out_features, kv_replica=kv_replica)
        else:
            out_local = _divide(out_features, tp.size, "output features")
            shard = Shard(tp_dim=0 if stack == 1 else 1)
        shape = (out_local, in_features) if stack == 1 else (stack, out_local, in_features)
        self.weight = _param(shape, shard)
        if bias:
            self.bias = _param((out_local,) if stack == 1 else (stack, out_local), shard)
        else:
            self.register_parameter("bias", None)

    def forward(self, x: Union[torch.Tensor, Fp8Input]) -> torch.Tensor:
        """x [s, b, in] ([s/tp, b, in] with sequence parallelism) -> [s, b, stack * out/tp]. x may come
        quantised (`Fp8Input`) where nothing stands between it and the GEMM: not with sequence
        parallelism, whose all-gather of x comes first."""
        if isinstance(x, Fp8Input):
            if self.sequence_parallel:
                raise ValueError("a sequence-parallel layer all-gathers its input: it takes it unquantised")
            return linear(replace(x, stand_in=copy_to_tp(x.stand_in, self.group)), self.weight, self.bias, self.fp8)
        x = gather_from_sp(x, self.group) if self.sequence_parallel else copy_to_tp(x, self.group)
        return linear(x, self.weight, self.bias, self.fp8)


class RowParallelLinear(nn.Module):
    """y = x W^T + b with W split along its input columns; partial sums reduced over tp."""

    def __init__(self, in_features: int, out_features: int, bias: bool, group: Optional[Group] = None,
                 sequence_parallel: bool = False, fp8: Optional[Fp8] = None):
        super().__init__()
        tp = _tp(group)
        self.group = tp.pg
        self.sequence_parallel = sequence_parallel
        self.fp8 = fp8
        self.weight = _param((out_features, _divide(in_features, tp.size, "input features")), Shard(tp_dim=1))
        if bias:
            self.bias = _param((out_features,), Shard(grad_needs_tp_sum=self.sequence_parallel))
        else:
            self.register_parameter("bias", None)

    def forward(self, x: Union[torch.Tensor, Fp8Input]) -> torch.Tensor:
        """x [s, b, in/tp] (or its `Fp8Input`) -> [s, b, out] ([s/tp, b, out] with sequence parallelism)."""
        y = linear(x, self.weight, fp8=self.fp8)
        y = reduce_scatter_to_sp(y, self.group) if self.sequence_parallel else reduce_from_tp(y, self.group)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Embedding table split by vocabulary rows; each rank looks up its rows, then reduce.

    `tied_copy`: this table is a pipeline stage's copy of one that the first stage owns (the head
    of a last stage with tied embeddings).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, group: Optional[Group] = None,
                 sequence_parallel: bool = False, tied_copy: bool = False):
        super().__init__()
        tp = _tp(group)
        self.group = tp.pg
        self.sequence_parallel = sequence_parallel
        self.rows_per_rank = _divide(num_embeddings, tp.size, "vocab size")
        self.vocab_start = tp.rank * self.rows_per_rank
        self.weight = _param((self.rows_per_rank, embedding_dim), Shard(tp_dim=0, tied_copy=tied_copy))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [s, b] -> [s, b, h] ([s/tp, b, h] with sequence parallelism)."""
        if self.group is None:
            return F.embedding(ids, self.weight)
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.rows_per_rank)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return reduce_scatter_to_sp(out, self.group)
        return reduce_from_tp(out, self.group)
