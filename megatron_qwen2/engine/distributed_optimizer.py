"""AdamW on fp32 master weights, optionally sharded over data parallelism (ZeRO-1).

The optimizer works on *fragments*: pieces of parameters paired with their fp32 master
copy and their fp32 main-grad view. Without sharding each parameter is one fragment. With
`distributed=True`, a rank owns 1/dp of every gradient bucket (the range the bucket's
reduce-scatter leaves summed on it), keeps master weights and Adam moments for that range
only, updates it, and the buffers all-gather the updated parameters afterwards. Expert
parameters (sharded over ep and etp) sit in buckets of the expert-dp group, so their shards are
1/expert_dp of those buckets; each bucket says which group it belongs to. With context parallelism
the dense buffer's group is dp x cp (the parameters are replicated over cp), so a shard is
1/(dp*cp) of a bucket; expert-dp already spans the cp ranks that hold the same experts.

Gradient norm: partial sums of squares are added over the groups that hold different pieces
(the buffer's group when sharded; ep and etp for experts), then over the model-parallel group
tp x cp x pp. The cp ranks of that group hold the same dense gradients, so only cp rank 0 brings
their sum to it; the expert sum is by then the whole stage's on every rank of the stage, so only
tp rank 0 and cp rank 0 bring it (engine/reductions.py names the groups).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_qwen2.config import OptimConfig
from megatron_qwen2.engine.grad_buffer import GradBuffer, grad_of
from megatron_qwen2.parallel.shard import shard_of


@dataclass
class Fragment:
    param: torch.nn.Parameter
    start: int  # flat range inside the parameter
    end: int
    master: torch.Tensor  # fp32; a view of the parameter itself when it is fp32
    counts_in_norm: torch.Tensor  # bool mask: False where another tp rank counts the element
    expert: bool = False  # sharded over ep: its squared norm is summed over ep too
    counts_all: bool = True  # the mask is all True (decided once, so the norm needs no host sync)


class MixedPrecisionOptimizer:
    """Clip by the global grad norm, AdamW on fp32 masters, write back to the model."""

    def __init__(self, buffer: GradBuffer, cfg: OptimConfig):
        self.buffer, self.cfg = buffer, cfg
        reductions = buffer.reductions
        # cp ranks hold the same (reduced) dense gradients; only the first counts them in the norm.
        # The stage's expert sum is on every rank of the stage; tp rank 0 of cp rank 0 counts it.
        self.cp_rank, self.tp_rank = reductions.cp.rank, reductions.tp.rank
        # Groups over which squared-norm partial sums are added (engine/reductions.py): the
        # model-parallel group last; before it, for dense parameters the buffer's group when sharded,
        # for expert parameters ep and etp (they hold other pieces) and the expert group when sharded.
        dense = [reductions.dense] if buffer.shard else []
        expert = [reductions.ep, reductions.etp] + ([reductions.expert] if buffer.shard else [])
        self.norm_groups = [g.pg for g in [reductions.norm] if g.pg is not None]
        self.dense_norm_groups = [g.pg for g in dense if g.pg is not None]
        self.expert_norm_groups = [g.pg for g in expert if g.pg is not None]
        self.has_experts = any(b.expert for b in buffer.buckets)
        self.fragments = self._make_fragments()
        decay = [f for f in self.fragments if f.param.ndim >= 2]
        no_decay = [f for f in self.fragments if f.param.ndim < 2]
        groups = [{"params": [f.master for f in decay], "weight_decay": cfg.weight_decay},
                  {"params": [f.master for f in no_decay], "weight_decay": 0.0}]
        groups = [g for g in groups if g["params"]]
        # One fused kernel over all masters on CUDA (the multi-tensor foreach version elsewhere).
        fused = bool(self.fragments) and self.fragments[0].master.is_cuda
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                                           fused=fused or None)
        self.num_steps = 0  # Adam steps taken (skipped steps do not count)

    def _make_fragments(self) -> list[Fragment]:
        frags = []
        for bucket in self.buffer.buckets:
            if self.buffer.shard:
                lo, hi = bucket.shard()
            else:
                lo, hi = bucket.start, bucket.end
            for p in bucket.params:
                off = self.buffer.offset[p]
                s, e = max(lo, off) - off, min(hi, off + p.numel()) - off
                if s >= e:
                    continue
                flat = p.detach().view(-1)[s:e]
                master = flat if p.dtype == torch.float32 else flat.float()
                shard = shard_of(p)
                # The tensor-group place decides which elements this rank counts (parallel/shard.py).
                tensor = shard.tensor_group(self.buffer.reductions.tp, self.buffer.reductions.etp)
                mask = shard.norm_mask(p.shape, tensor.rank, tensor.size, p.device)[s:e]
                frags.append(Fragment(p, s, e, master, mask, expert=bucket.expert, counts_all=bool(mask.all())))
        return frags

    def _grad(self, f: Fragment) -> torch.Tensor:
        return grad_of(f.param).view(-1)[f.start:f.end]

    def grad_norm(self) -> float:
        """The L2 norm of the full model's gradient, identical on every rank."""
        sq = torch.zeros(2, dtype=torch.float32, device=self.buffer.grad_data.device)  # [dense, expert]
        for expert in (False, True):
            frags = [f for f in self.fragments if f.expert == expert]
            grads = [self._grad(f) if f.counts_all else self._grad(f) * f.counts_in_norm for f in frags]
            if not grads:
                continue
            if sq.is_cuda:  # multi-tensor norms: a few kernels and no host sync
                sq[int(expert)] = torch.stack(torch._foreach_norm(grads)).square().sum()
            else:  # the CPU's per-tensor sums of squares round less than its foreach norms
                sq[int(expert)] = torch.stack([g.square().sum() for g in grads]).sum()
        for group in self.dense_norm_groups:
            part = sq[:1].clone()
            dist.all_reduce(part, group=group)
            sq[:1] = part
        if self.has_experts:  # the same on every rank of an ep / expert-dp group (one pipeline stage)
            for group in self.expert_norm_groups:
                part = sq[1:].clone()
                dist.all_reduce(part, group=group)
                sq[1:] = part
        # Model-parallel groups last: a pipeline stage without experts must receive the expert sums
        # of the other stages only after each stage has summed them over its ep group.
        if self.cp_rank != 0:  # its sums equal cp rank 0's: the model-parallel sum counts them once
            sq.zero_()
        elif self.tp_rank != 0:  # the stage's expert sum equals tp rank 0's
            sq[1:] = 0
        for group in self.norm_groups:
            dist.all_reduce(sq, group=group)
        return sq.sum().sqrt().item()

    @torch.no_grad()
    def step(self, lr: float, skip_nonfinite: bool = False) -> float:
        """Clip, update, copy masters back into the parameters; returns the pre-clip grad norm.

        With `skip_nonfinite`, a NaN/Inf norm (the same on every rank) leaves weights and Adam state untouched.
        """
        norm = self.grad_norm()
        if skip_nonfinite and not math.isfinite(norm):
            return norm
        scale = 1.0
        if self.cfg.clip_grad > 0 and norm > self.cfg.clip_grad:
            scale = self.cfg.clip_grad / (norm + 1e-6)
        grads = [self._grad(f) for f in self.fragments]  # views of the main grads: no copies
        if scale != 1.0:  # clipped in place (the buffer is zeroed before the next step's backward)
            torch._foreach_mul_(grads, scale)
        for f, g in zip(self.fragments, grads):
            f.master.grad = g
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.num_steps += 1
        copies = [f for f in self.fragments if f.param.dtype != torch.float32]
        for f in self.fragments:
            f.master.grad = None
        if copies:
            torch._foreach_copy_([f.param.detach().view(-1)[f.start:f.end] for f in copies],
                                 [f.master for f in copies])
        self.buffer.gather_params()
        return norm

    # Checkpoint state in the canonical layout: one entry per fragment (the checkpoint code knows
    # where each fragment sits in its global tensor, checkpoint/sharding.py).
    def state_dict(self) -> dict:
        """{"step": Adam steps taken, "fragments": [{"master", "exp_avg", "exp_avg_sq"} per fragment]}.

        The tensors are fp32 and live (not copies); moments are zeros before the first step.
        """
        frags = []
        for f in self.fragments:
            st = self.optimizer.state.get(f.master)
            if st is None:  # before the first step
                st = {"exp_avg": torch.zeros_like(f.master), "exp_avg_sq": torch.zeros_like(f.master)}
            frags.append({"master": f.master, "exp_avg": st["exp_avg"], "exp_avg_sq": st["exp_avg_sq"]})
        return {"step": self.num_steps, "fragments": frags}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Load a `state_dict()`-shaped dict; fragments without moments (weights only) start Adam afresh.

        The moment tensors are taken over, not copied (the caller hands in tensors it no longer needs).
        """
        frags = state["fragments"]
        if len(frags) != len(self.fragments):
            raise ValueError(f"optimizer state has {len(frags)} fragments, this rank has {len(self.fragments)}")
        self.num_steps = int(state["step"])
        for f, st in zip(self.fragments, frags):
            f.master.copy_(st["master"])
            if f.param.dtype != torch.float32:  # else the master is a view of the parameter
                f.param.detach().view(-1)[f.start:f.end].copy_(f.master)
            self.optimizer.state.pop(f.master, None)
            if self.num_steps > 0 and "exp_avg" in st:
                self.optimizer.state[f.master] = {
                    # the fused kernel reads the step count on the device, the foreach one on the host
                    "step": torch.tensor(float(self.num_steps), dtype=torch.float32,
                                         device=f.master.device if self.optimizer.defaults.get("fused") else "cpu"),
                    "exp_avg": st["exp_avg"].to(f.master),
                    "exp_avg_sq": st["exp_avg_sq"].to(f.master)}
        self.buffer.gather_params()
