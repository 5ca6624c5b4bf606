"""AdamW on fp32 master weights, optionally sharded over data parallelism (ZeRO-1).

The optimizer works on *fragments*: pieces of parameters paired with their fp32 master
copy and their fp32 main-grad view. Without sharding each parameter is one fragment. With
`distributed=True`, a rank owns 1/dp of every gradient bucket (the range the bucket's
reduce-scatter leaves summed on it), keeps master weights and Adam moments for that range
only, updates it, and the buffers all-gather the updated parameters afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from megatron_qwen2.config import OptimConfig
from megatron_qwen2.parallel.grad_buffer import GradBuffer


@dataclass
class Fragment:
    param: torch.nn.Parameter
    start: int  # flat range inside the parameter
    end: int
    master: torch.Tensor  # fp32; a view of the parameter itself when it is fp32
    counts_in_norm: torch.Tensor  # bool mask: False where another tp rank counts the element


class MixedPrecisionOptimizer:
    """Clip by the global grad norm, AdamW on fp32 masters, write back to the model."""

    def __init__(self, buffer: GradBuffer, cfg: OptimConfig, tp_group: Optional[dist.ProcessGroup],
                 norm_groups: list[Optional[dist.ProcessGroup]]):
        self.buffer, self.cfg = buffer, cfg
        self.tp_group = tp_group
        self.tp_rank = 0 if tp_group is None else dist.get_rank(tp_group)
        # Groups over which squared-norm partial sums are added: model-parallel ones, plus dp when sharded.
        self.norm_groups = [g for g in norm_groups if g is not None]
        if buffer.shard and buffer.dp_group is not None:
            self.norm_groups.append(buffer.dp_group)
        self.fragments = self._make_fragments()
        decay = [f for f in self.fragments if f.param.ndim >= 2]
        no_decay = [f for f in self.fragments if f.param.ndim < 2]
        groups = [{"params": [f.master for f in decay], "weight_decay": cfg.weight_decay},
                  {"params": [f.master for f in no_decay], "weight_decay": 0.0}]
        groups = [g for g in groups if g["params"]]
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)

    def _make_fragments(self) -> list[Fragment]:
        frags = []
        for bucket in self.buffer.buckets:
            if self.buffer.shard:
                lo, hi = bucket.shard(self.buffer.dp, self.buffer.dp_rank)
            else:
                lo, hi = bucket.start, bucket.end
            for p in bucket.params:
                off = self.buffer.offset[p]
                s, e = max(lo, off) - off, min(hi, off + p.numel()) - off
                if s >= e:
                    continue
                flat = p.detach().view(-1)[s:e]
                master = flat if p.dtype == torch.float32 else flat.float()
                frags.append(Fragment(p, s, e, master, self._norm_mask(p)[s:e]))
        return frags

    def _norm_mask(self, p: torch.nn.Parameter) -> torch.Tensor:
        """Elements of p this rank counts in the grad norm: replicated ones count on one rank only."""
        mask = torch.ones(p.numel(), dtype=torch.bool, device=p.device)
        if getattr(p, "pipeline_copy", False):  # the last stage's copy of the tied embedding
            mask.fill_(False)
        elif getattr(p, "tp_split_dim", None) is None:
            mask.fill_(self.tp_rank == 0)
        elif getattr(p, "tp_kv_replica", None) is not None:
            kv_head, nkv, rows = p.tp_kv_replica
            replicas = dist.get_world_size(self.tp_group) // nkv
            if self.tp_rank % replicas != 0:  # not the first holder of this kv head
                mask.view(p.shape[0], -1)[rows] = False
        return mask

    def _grad(self, f: Fragment) -> torch.Tensor:
        return f.param.main_grad.view(-1)[f.start:f.end]

    def grad_norm(self) -> float:
        """The L2 norm of the full model's gradient, identical on every rank."""
        sq = torch.zeros((), dtype=torch.float32, device=self.buffer.grad_data.device)
        for f in self.fragments:
            g = self._grad(f)
            sq += (g * f.counts_in_norm).square().sum() if not f.counts_in_norm.all() else g.square().sum()
        for group in self.norm_groups:
            dist.all_reduce(sq, group=group)
        return sq.sqrt().item()

    @torch.no_grad()
    def step(self, lr: float) -> float:
        """Clip, update, copy masters back into the parameters; returns the pre-clip grad norm."""
        norm = self.grad_norm()
        scale = 1.0
        if self.cfg.clip_grad > 0 and norm > self.cfg.clip_grad:
            scale = self.cfg.clip_grad / (norm + 1e-6)
        for f in self.fragments:
            f.master.grad = self._grad(f) * scale if scale != 1.0 else self._grad(f)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        for f in self.fragments:
            f.master.grad = None
            if f.param.dtype != torch.float32:
                f.param.detach().view(-1)[f.start:f.end].copy_(f.master)
        self.buffer.gather_params()
        return norm

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)
