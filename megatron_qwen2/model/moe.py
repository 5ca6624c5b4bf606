"""Qwen2-MoE sparse block: fp32 softmax router, top-k experts sharded over ep, sigmoid-gated shared expert."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Mapping, NamedTuple, Optional, Union

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from megatron_qwen2 import ops
from megatron_qwen2.config import ModelConfig
from megatron_qwen2.model.mlp import MLP
from megatron_qwen2.ops.fp8 import (Fp8, Fp8Input, Fp8Tensor, add_weight_gemm, fused_recipe, gemm, group_ends,
                                    grouped_gemm, grouped_weight_gemm, host_to_device, keep_t, padded, quantize_input,
                                    quantize_pair, t_again)
from megatron_qwen2.parallel.cp import sum_over_cp
from megatron_qwen2.parallel.expert_dispatch import TokenDispatcher, capacity_mask, expert_capacity
from megatron_qwen2.parallel.mappings import gather_from_sp, scatter_to_sp
from megatron_qwen2.parallel.shard import Shard, set_shard
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

    def forward(self, x: torch.Tensor, return_logits: bool = False):
        """x [t, h] -> top-k weights [t, k] (x's dtype), expert ids [t, k], sums [2, E] (counts, probs),
        and the logits [t, E] if asked."""
        logits = F.linear(x, self.weight)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        counts = torch.bincount(experts.reshape(-1), minlength=probs.shape[-1]).to(torch.float32)
        out = weights.to(x.dtype), experts, torch.stack([counts, probs.sum(0)])
        return out + (logits,) if return_logits else out


def _use_grouped_mm(x: torch.Tensor) -> bool:
    """torch._grouped_mm: CUDA bf16 on Hopper or newer, where it is one kernel for all experts."""
    return (hasattr(torch, "_grouped_mm") and x.is_cuda and x.dtype == torch.bfloat16
            and torch.cuda.get_device_capability(x.device)[0] >= 9)


def grouped_linear(x: Union[torch.Tensor, Fp8Input], weight: torch.Tensor, counts: list[int],
                   fp8: Optional[Fp8] = None) -> torch.Tensor:
    """Rows of x grouped by expert (counts[i] rows for expert i) times weight[i]^T: [M, in] -> [M, out].

    In FP8 when `fp8` is given (`_Fp8GroupedLinear`, on groups padded to the recipe's token
    multiple: `in_padded_groups`; x may come quantised as its `Fp8Input` when its groups are
    padded already); else one grouped GEMM where available, else one matmul per expert (empty
    groups included, so that every weight stays in the graph); never a loop over tokens.
    """
    if isinstance(x, Fp8Input):
        multiple = fp8.recipe.token_multiple if fp8 is not None else 0
        if not multiple or any(c % multiple for c in counts):
            raise ValueError("an FP8-quantised input reached a grouped linear layer without FP8 or with groups "
                             f"not padded to the recipe's token multiple ({multiple})")
        return _Fp8GroupedLinear.apply(x.stand_in, weight, counts, fp8, x)
    if fp8 is not None:
        return in_padded_groups(
            lambda xp, groups: _Fp8GroupedLinear.apply(xp, weight, groups, fp8, quantize_input(xp, fp8.recipe)),
            x, counts, fp8.recipe.token_multiple)
    if _use_grouped_mm(x):
        return _ContiguousGrad.apply(torch._grouped_mm(x, weight.transpose(1, 2), offs=group_ends(counts, x.device)))
    # unbind, not weight[i]: its backward stacks the experts' gradients once, where indexing
    # would add a full-size zero-padded gradient per expert.
    weights = weight.unbind(0)
    return torch.cat([F.linear(chunk, weights[i]) for i, chunk in enumerate(torch.split(x, counts))])


def expert_mlp(rows: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, counts: list[int],
               fp8: Optional[Fp8] = None) -> torch.Tensor:
    """The routed experts' SwiGLU MLP on rows grouped by expert (counts[i] rows for expert i):
    down_i(swiglu(gate_up_i(x))). In FP8 the groups are padded once for both grouped linears, not
    around each (zero rows stay zero through both and through SwiGLU), and SwiGLU hands its output
    to the down projection quantised (`ops.swiglu_fp8`) as a dense MLP's does."""
    def mlp(x, groups):
        h = grouped_linear(x, gate_up, groups, fp8)
        fused = fused_recipe(fp8)
        return grouped_linear(ops.swiglu(h) if fused is None else ops.swiglu_fp8(h, fused), down, groups, fp8)
    if fp8 is None:
        return mlp(rows, counts)
    return in_padded_groups(mlp, rows, counts, fp8.recipe.token_multiple)


def in_padded_groups(fn, x: torch.Tensor, counts: list[int], multiple: int) -> torch.Tensor:
    """fn(x', counts') with x's groups each padded with zero rows to a multiple of `multiple` rows
    (x', counts' their sizes), the padding rows of its result dropped: the layout FP8 grouped GEMMs
    take (every group starts where a GEMM may start reading; no 1 x 128 tile along the tokens spans
    two experts). Padding and dropping are each other's backward."""
    padded_counts = [padded(c, multiple) for c in counts]
    if padded_counts == counts:
        return fn(x, counts)
    keep = _rows_kept(counts, padded_counts, x.device)
    return _DropPadding.apply(fn(_PadGroups.apply(x, keep, sum(padded_counts)), padded_counts), keep)


class _Fp8GroupedLinear(torch.autograd.Function):
    """grouped_linear with the forward, input-gradient and weight-gradient GEMMs in FP8 (ops/fp8.py),
    on groups whose sizes are multiples of the recipe's token multiple (`in_padded_groups`).

    x comes as its `Fp8Input` (x the stand-in) and is saved for backward as a linear layer's is
    (`_Fp8Linear`, parallel/layers.py). Each operand is quantised once for all experts: tensorwise
    and rowwise scales are those of all the layer's rows (zero padding rows change no amax), 1 x 128
    tiles lie within one expert. The products are `grouped_gemm` and `grouped_weight_gemm`: one
    grouped GEMM where the recipe has one, else one GEMM per expert. Experts without rows get no
    gradient.
    """

    @staticmethod
    def forward(ctx, x, weight, counts: list[int], fp8: Fp8, xin: Fp8Input):
        rcp = fp8.recipe
        w8 = fp8.weights.get(weight, rcp, experts=True)
        y = grouped_gemm(xin.q, w8.w, counts, x.dtype, fp8.grouped_gemms)
        saved, ctx.remake_t = keep_t(xin)
        ctx.save_for_backward(*saved)
        ctx.weight = weight  # the parameter, with its main_grad (parallel/layers.py, _LinearMainGrad)
        ctx.recipe, ctx.counts, ctx.weight8, ctx.grouped = rcp, counts, w8, fp8.grouped_gemms
        return y

    @staticmethod
    def backward(ctx, dy):
        weight, rcp, counts = ctx.weight, ctx.recipe, ctx.counts
        xt = t_again(ctx.saved_tensors, ctx.remake_t, rcp.activation_tiling)
        dyq, dyt = quantize_pair(dy, rcp.activation_tiling, rcp.grad_dtype)
        dx = grouped_gemm(dyq, ctx.weight8.t(), counts, dy.dtype, ctx.grouped)
        dws = grouped_weight_gemm(dyt, xt, counts, ctx.grouped)
        return dx, _expert_weight_grad(weight, dws), None, None, None


def _rows_kept(counts: list[int], padded_counts: list[int], device: torch.device) -> torch.Tensor:
    """The indices of the real rows among the padded groups'."""
    starts = [0]
    for p in padded_counts[:-1]:
        starts.append(starts[-1] + p)
    return host_to_device(torch.cat([torch.arange(s, s + c) for s, c in zip(starts, counts)]), device)


def _pad_groups(x: torch.Tensor, keep: torch.Tensor, rows: int) -> torch.Tensor:
    return x.new_zeros(rows, x.shape[1]).index_copy_(0, keep, x)


class _PadGroups(torch.autograd.Function):
    """x's rows placed at `keep` among `rows` zero rows; backward: the gradient's rows at `keep`."""

    @staticmethod
    def forward(ctx, x, keep, rows: int):
        ctx.save_for_backward(keep)
        return _pad_groups(x, keep, rows)

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return grad.index_select(0, keep), None, None


class _DropPadding(torch.autograd.Function):
    """y's rows at `keep`; backward: the gradient placed at `keep` among zero rows."""

    @staticmethod
    def forward(ctx, y, keep):
        ctx.save_for_backward(keep)
        ctx.rows = y.shape[0]
        return y.index_select(0, keep)

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return _pad_groups(grad, keep, ctx.rows), None


def _expert_weight_grad(weight: torch.Tensor,
                        dws: "torch.Tensor | Iterator[tuple[int, Fp8Tensor, Fp8Tensor]]") -> torch.Tensor:
    """The gradient for a 3D expert weight from `grouped_weight_gemm`'s result (one [G, out, in]
    tensor, or for each expert with rows the operands of its product), added to main_grad where
    there is one: each expert's product into main_grad[e] by `add_weight_gemm` (no fp32 product of
    the whole). Autograd is then handed a placeholder: the [G, out, in] tensor itself where it has
    the weight's dtype (no second weight-sized tensor beside it), else an uninitialised one."""
    if hasattr(weight, "main_grad"):
        main = weight.main_grad.view(weight.shape)
        weight.wgrad_in_main_grad = True
        if isinstance(dws, torch.Tensor):
            main.add_(dws)
            return dws if dws.dtype == weight.dtype else torch.empty_like(weight)
        for e, dyt, xt in dws:
            add_weight_gemm(dyt, xt, main[e])
        return torch.empty_like(weight)
    if isinstance(dws, torch.Tensor):
        return dws.to(weight.dtype)
    grad = torch.zeros_like(weight)
    for e, dyt, xt in dws:
        grad[e].copy_(gemm(dyt, xt, torch.float32))
    return grad


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient dense (_grouped_mm rejects broadcast ones)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


class Experts(nn.Module):
    """This rank's routed experts as 3D weights [E/ep, ...], cut over ep along dimension 0 and, with
    expert-tensor parallelism, over etp along the FFN dimension.

    Expert e of the model lives on ep rank e // (E/ep) as local expert e % (E/ep). Each expert's
    gate and up rows are column-split over etp (etp rank r holds rows r*f/etp ... of the gate and
    the same rows of the up projection, as [gate | up] of f/etp rows each) and its down projection
    row-split, so an etp rank's output is a partial sum over etp. Input rows arrive grouped by
    local expert.
    """

    def __init__(self, cfg: ModelConfig, topo: Topology, fp8: Optional[Fp8] = None):
        super().__init__()
        self.fp8 = fp8
        e, h, f = cfg.num_experts // topo.ep, cfg.hidden_size, cfg.moe_ffn_hidden_size
        fl = f // topo.etp
        self.gate_up_weight = nn.Parameter(torch.empty(e, 2 * fl, h))  # per expert [gate | up] rows
        self.down_weight = nn.Parameter(torch.empty(e, h, fl))
        if topo.etp == 1:
            set_shard(self.gate_up_weight, Shard(ep_dim=0))
            set_shard(self.down_weight, Shard(ep_dim=0))
        else:
            r = topo.etp_rank
            rows = tuple(range(r * fl, (r + 1) * fl)) + tuple(range(f + r * fl, f + (r + 1) * fl))
            set_shard(self.gate_up_weight, Shard(ep_dim=0, tp_dim=1, tp_rows=rows, tp_dim_size=2 * f))
            set_shard(self.down_weight, Shard(ep_dim=0, tp_dim=2))

    def forward(self, rows: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """rows [M, h] grouped by local expert (counts[i] rows each) -> expert outputs [M, h]."""
        return expert_mlp(rows, self.gate_up_weight, self.down_weight, counts, self.fp8)


def _share(t: torch.Tensor, tp_group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """This tp rank's contiguous 1/tp of the rows of `t` (not differentiable: routing decisions)."""
    if tp_group is None:
        return t
    return t.chunk(dist.get_world_size(tp_group))[dist.get_rank(tp_group)]


class MoEStats(NamedTuple):
    """What one MoE block's forward measured of one micro-batch on this rank."""

    router_sums: torch.Tensor  # [2, E] the aux-loss statistic (top-k counts, router probabilities), differentiable
    tokens_per_expert: torch.Tensor  # [E] fp32: top-k assignments of this rank's tokens per expert (no grad)
    dropped: int  # token copies the capacity limit dropped
    z_loss: Optional[torch.Tensor]  # mean over this rank's tokens of logsumexp(router logits)^2; None when off


def z_loss_term(stats: Mapping[int, MoEStats], coef: float, scale: float) -> Optional[torch.Tensor]:
    """(coef * the layers' summed z-losses) * scale: the z-loss's part of a micro-batch's objective
    (None when the z-loss is off or there is no MoE layer)."""
    losses = [s.z_loss for s in stats.values() if s.z_loss is not None]
    if not losses:
        return None
    return (coef * sum(losses)) * scale


class MoEBlock(nn.Module):
    """out = sum_k w_k expert_k(x) + sigmoid(shared_expert_gate(x)) * shared_expert(x).

    Router, gate and shared expert stay in the attention layout: replicated over tp (the shared
    expert is tp-sharded like a dense MLP) and see every token: under sequence parallelism the block
    gathers the sequence on entry (its backward only splits, since every rank computes the same
    thing) and keeps its own shard on exit. The routed experts live in the expert layout (etp x ep
    x expert-dp folded over the same ranks, parallel/topology.py): each tp rank routes only its
    1/tp share of the tokens (its sequence-parallel shard; without sequence parallelism the same
    contiguous slice), so every token of a stage reaches its experts once, and `TokenDispatcher`
    moves the copies to the ranks of their experts and back. The routed output of the share is
    then this rank's shard under sequence parallelism, and is all-gathered over tp without it. The
    split's backward all-gathers and the gather's backward splits, so the router and the shared
    expert see the full gradient on every tp rank, as the replicated computation they are. A
    capacity limit is decided over all the tokens of the micro-batch before they are split.

    Aux loss: the router sums [2, E] cover exactly one micro-batch (all of its sequence, gathered
    over tp and summed over cp), which is Megatron's `aux_loss` statistic over the tp x cp group
    that shares a sequence. The ep ranks each run a different micro-batch, so their statistics are
    not pooled: that keeps the loss a function of the micro-batch alone and every layout equal to
    one process. With cp > 1 the block returns the cp sums divided by cp, i.e. the statistic of the
    micro-batch scaled to this rank's token count (the loss divides by the local count), and each
    cp rank back-propagates the aux loss into its own tokens only (`sum_over_cp`).

    z-loss (model.moe_z_loss_coef > 0): the mean over this rank's tokens of logsumexp(router
    logits)^2, returned in `MoEStats.z_loss`; the caller adds coef * it, weighted like the
    micro-batch, to the objective (`z_loss_term`). With cp > 1 each cp rank's mean covers its share
    of the tokens, so each adds 1/cp of it.

    The forward returns its statistics as values (`MoEStats`) and keeps none: a forward that is
    run again (recomputation in backward) or without gradients (validation) counts only where its
    caller keeps what it returns.
    """

    def __init__(self, cfg: ModelConfig, topo: Topology, fp8: Optional[Fp8] = None):
        super().__init__()
        self.sp_group = topo.groups.tp.pg if topo.sequence_parallel else None
        self.cp_group, self.cp = topo.groups.cp.pg, topo.cp
        self.router = Router(cfg)
        self.experts = Experts(cfg, topo, fp8)
        self.tp_group = topo.groups.tp.pg
        self.num_experts, self.capacity_factor = cfg.num_experts, cfg.moe_capacity_factor
        self.dispatcher = TokenDispatcher(cfg.num_experts, topo.groups.ep.pg, topo.groups.etp.pg)
        self.z_loss_coef = cfg.moe_z_loss_coef
        self.overlap_shared_expert = True
        self._stream = None
        if cfg.shared_expert_ffn_hidden_size > 0:
            self.shared_expert = MLP(cfg.hidden_size, cfg.shared_expert_ffn_hidden_size, topo.groups.tp, fp8=fp8)
            self.shared_expert_gate = nn.Linear(cfg.hidden_size, 1, bias=False)
        else:
            self.shared_expert = None

    def _side_stream(self, tokens: torch.Tensor):
        if not (tokens.is_cuda and self.shared_expert is not None and self.overlap_shared_expert):
            return None
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=tokens.device)
        self._stream.wait_stream(torch.cuda.current_stream())  # tokens are ready
        tokens.record_stream(self._stream)
        return self._stream

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, MoEStats]:
        """x [s, b, h] ([s/tp, b, h] with sequence parallelism) -> same shape, this forward's statistics."""
        x = gather_from_sp(x, self.sp_group, grad_is_partial=False)
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        weights, experts, sums, logits = self.router(tokens, return_logits=True)
        # The shared expert needs no routing. On CUDA it runs on a side stream, overlapping the
        # dispatch and its all-to-alls (autograd runs its backward on that stream too).
        side = self._side_stream(tokens)
        shared = None
        if self.shared_expert is not None:
            with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
                shared = torch.sigmoid(self.shared_expert_gate(tokens)) * self.shared_expert(tokens)
        keep, dropped = None, 0
        if self.capacity_factor is not None:  # decided over the whole micro-batch (this cp rank's tokens)
            cap = expert_capacity(tokens.shape[0], experts.shape[-1], self.num_experts, self.capacity_factor)
            keep = capacity_mask(experts, weights, self.num_experts, cap)
            dropped = int((~keep).sum())
            keep = _share(keep, self.tp_group)
        fp8 = self.experts.fp8  # FP8 experts take each expert's rows padded: permute pads them
        rows, counts, state = self.dispatcher.dispatch(
            scatter_to_sp(tokens, self.tp_group), scatter_to_sp(weights, self.tp_group),
            _share(experts, self.tp_group), keep, 1 if fp8 is None else fp8.recipe.token_multiple)
        routed = self.dispatcher.combine(self.experts(rows, counts), state)  # this tp rank's share
        if self.sp_group is None:
            routed = gather_from_sp(routed, self.tp_group, grad_is_partial=False)
        if shared is not None:
            if side is not None:
                torch.cuda.current_stream().wait_stream(side)
                shared.record_stream(torch.cuda.current_stream())
            shared = scatter_to_sp(shared, self.sp_group)
        out = routed if shared is None else routed + shared
        z_loss = torch.logsumexp(logits.float(), dim=-1).square().mean() if self.z_loss_coef > 0 else None
        tokens_per_expert = sums[0].detach()  # this rank's tokens (the logged load sums over dp x cp)
        if self.cp_group is not None:
            sums = sum_over_cp(sums, self.cp_group) / self.cp
        stats = MoEStats(router_sums=sums, tokens_per_expert=tokens_per_expert, dropped=dropped, z_loss=z_loss)
        return out.view((-1,) + tuple(shape[1:])), stats


@dataclass(frozen=True)
class MoELoad:
    """One MoE layer's statistics summed over the forwards of a step on this rank."""

    tokens_per_expert: torch.Tensor  # [E] fp32
    dropped: int
    z_loss_sum: Optional[torch.Tensor]  # None when the z-loss is off
    forwards: int  # the micro-batches counted


def add_moe_stats(load: Mapping[int, MoELoad], stats: Mapping[int, MoEStats]) -> dict[int, MoELoad]:
    """`load` (per MoE layer, by global layer index) with one forward's statistics added."""
    out = dict(load)
    for layer, s in stats.items():
        z = None if s.z_loss is None else s.z_loss.detach()
        seen = out.get(layer)
        if seen is None:
            out[layer] = MoELoad(s.tokens_per_expert, s.dropped, z, 1)
        else:
            out[layer] = MoELoad(seen.tokens_per_expert + s.tokens_per_expert, seen.dropped + s.dropped,
                                 None if z is None else seen.z_loss_sum + z, seen.forwards + 1)
    return out


def moe_load_metrics(load: Mapping[int, MoELoad], group: Optional[dist.ProcessGroup]) -> dict:
    """The logged form of a step's per-layer statistics (`load`, this rank's), summed over `group` (dp).

    Collective over `group`. Returns {"moe_max_over_mean": the worst layer's max/mean tokens per
    expert, "moe_load": {layer: {"tokens_per_expert": [...], "max_over_mean": r, "dropped": n}}},
    plus "moe_z_loss" (summed over layers, averaged over micro-batches) when the z-loss is on.
    """
    if not load:
        return {}
    layers = sorted(load)
    z_on = any(load[layer].z_loss_sum is not None for layer in layers)
    rows = []  # per layer: tokens per expert..., dropped, forwards, z-loss sum
    for layer in layers:
        m = load[layer]
        tokens = m.tokens_per_expert.float()
        z = tokens.new_zeros(1) if m.z_loss_sum is None else m.z_loss_sum.float().reshape(1)
        rows.append(torch.cat([tokens, tokens.new_tensor([float(m.dropped), float(m.forwards)]), z]))
    loads = torch.stack(rows)
    if group is not None:
        dist.all_reduce(loads, group=group)
    loads = loads.cpu()
    stats, z_loss = {}, 0.0
    for layer, row in zip(layers, loads):
        tokens = row[:-3]
        ratio = (tokens.max() / tokens.mean()).item() if tokens.sum() > 0 else 0.0
        stats[str(layer)] = {"tokens_per_expert": [int(v) for v in tokens.tolist()], "max_over_mean": ratio,
                             "dropped": int(row[-3])}
        z_loss += (row[-1] / row[-2]).item()
    out = {"moe_max_over_mean": max(s["max_over_mean"] for s in stats.values()), "moe_load": stats}
    if z_on:
        out["moe_z_loss"] = z_loss
    return out
