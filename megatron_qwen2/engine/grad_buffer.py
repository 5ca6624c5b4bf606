"""Data-parallel gradients: contiguous fp32 main grads, reduced in buckets during backward.

Every parameter gets `main_grad`, a view into one flat fp32 buffer, and (for the
distributed optimizer) its data is moved into a flat parameter buffer with the same layout.
Parameters are laid out in reverse registration order, roughly the order backward produces
their gradients, and cut into buckets of about `bucket_size` elements. When the last
gradient of a bucket arrives, the bucket is summed over dp asynchronously (all-reduce, or
reduce-scatter when each rank only updates its own shard), overlapping the rest of the
backward pass. Gradient accumulation: a parameter is ready once it has received its
gradient from every micro-batch of the step (`start_step(num_microbatches)`), whatever order a
pipeline schedule runs them in. Parameters listed in `deferred` (the tied embedding copies
of a pipeline) sit in buckets of their own that `finish` reduces only after `before_deferred`
has run, so that their cross-stage sum happens on the unreduced gradients.

Dense parameters are reduced over `reductions.dense` and expert parameters, which sit in buckets of
their own, over `reductions.expert` (engine/reductions.py says which groups those are: dp x cp and
expert_dp x cp). Every bucket carries its group, so the optimizer, the all-gather of updated shards
and the checkpoint writers follow it.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

from megatron_qwen2.engine.reductions import GradientReductions
from megatron_qwen2.parallel.mappings import _all_gather_single, _reduce_scatter_single
from megatron_qwen2.parallel.shard import shard_of
from megatron_qwen2.parallel.topology import Group


@dataclass
class Bucket:
    """A contiguous range [start, end) of the flat buffers, reduced over `group` (its `size` ranks,
    this one at `rank`); its length is a multiple of `size`."""

    start: int
    end: int
    params: list[torch.nn.Parameter]
    group: Optional[dist.ProcessGroup] = None
    size: int = 1
    rank: int = 0
    expert: bool = False
    deferred: bool = False
    pending: set = field(default_factory=set)
    handle: Optional[dist.Work] = None

    def shard(self) -> tuple[int, int]:
        """The flat range of this bucket that this rank owns under the distributed optimizer."""
        n = (self.end - self.start) // self.size
        return self.start + self.rank * n, self.start + (self.rank + 1) * n


def grad_of(p: torch.nn.Parameter) -> Optional[torch.Tensor]:
    """The gradient the optimizer will use: the fp32 main grad when there is one, else `.grad`."""
    g = getattr(p, "main_grad", None)
    return p.grad if g is None else g


class GradBuffer:
    """fp32 main grads for `params`, summed bucket by bucket over the groups of `reductions`."""

    def __init__(self, params: list[torch.nn.Parameter], reductions: GradientReductions = GradientReductions(),
                 bucket_size: int = 40_000_000, shard: bool = False, overlap: bool = True,
                 deferred: Optional[list[torch.nn.Parameter]] = None):
        params = [p for p in params if p.requires_grad]
        dtypes = {p.dtype for p in params}
        if len(dtypes) != 1:
            raise ValueError(f"all parameters must share one dtype for the flat buffers, found {sorted(map(str, dtypes))}")
        self.params = params
        self.reductions = reductions
        self.shard, self.overlap = shard, overlap
        deferred_ids = {id(p) for p in deferred or []}
        # Expert parameters (sharded over ep) are replicated over expert-dp, not dp.
        regular = [p for p in params[::-1] if id(p) not in deferred_ids and not shard_of(p).is_expert]
        experts = [p for p in params[::-1] if id(p) not in deferred_ids and shard_of(p).is_expert]
        late = [p for p in params[::-1] if id(p) in deferred_ids]
        self.buckets = []
        for group_params, group, kind in ((regular, reductions.dense, "regular"),
                                          (experts, reductions.expert, "expert"), (late, reductions.dense, "deferred")):
            start = self.buckets[-1].end if self.buckets else 0
            for bucket in self._plan(group_params, bucket_size, group, start=start):
                bucket.expert, bucket.deferred = kind == "expert", kind == "deferred"
                self.buckets.append(bucket)
        total = self.buckets[-1].end if self.buckets else 0
        device = params[0].device
        self.grad_data = torch.zeros(total, dtype=torch.float32, device=device)
        # Parameters live in one flat buffer too, so that updated shards can be all-gathered.
        self.param_data = torch.zeros(total, dtype=params[0].dtype, device=device)
        self.bucket_of: dict[torch.nn.Parameter, Bucket] = {}
        self.offset: dict[torch.nn.Parameter, int] = {}
        for bucket in self.buckets:
            pos = bucket.start
            for p in bucket.params:
                n = p.numel()
                self.param_data[pos:pos + n].copy_(p.detach().reshape(-1))
                p.data = self.param_data[pos:pos + n].view_as(p)
                p.main_grad = self.grad_data[pos:pos + n].view_as(p)
                self.bucket_of[p], self.offset[p] = bucket, pos
                pos += n
        self._expected = 1
        self._count: dict[int, int] = {}
        # The hooks reach the buffer weakly: a parameter's hook holding it would make a cycle
        # (parameter -> hook -> buffer -> parameter) that Python's collector does not free.
        on_grad = weakref.WeakMethod(self._on_grad)
        self._hooks = [p.register_post_accumulate_grad_hook(lambda q: on_grad()(q)) for p in params]
        self.start_step(1)

    @staticmethod
    def _plan(params: list[torch.nn.Parameter], bucket_size: int, group: Group, start: int = 0) -> list[Bucket]:
        def close(ps, s, e):
            e = s + -(-(e - s) // group.size) * group.size  # pad so every rank of the group gets an equal shard
            return Bucket(s, e, list(ps), group=group.pg, size=group.size, rank=group.rank)

        buckets, current, pos = [], [], start
        for p in params:
            current.append(p)
            pos += p.numel()
            if pos - start >= bucket_size:
                buckets.append(close(current, start, pos))
                start = pos = buckets[-1].end
                current = []
        if current:
            buckets.append(close(current, start, pos))
        return buckets

    def start_step(self, num_microbatches: int) -> None:
        """Zero the main grads; each parameter will receive one gradient per micro-batch."""
        self.grad_data.zero_()
        self._expected = num_microbatches
        self._count = {id(p): 0 for p in self.params}
        for b in self.buckets:
            b.pending = set(map(id, b.params))
            b.handle = None

    def _on_grad(self, p: torch.nn.Parameter) -> None:
        if getattr(p, "wgrad_in_main_grad", False):  # the GEMM already added it (layers._LinearMainGrad)
            p.wgrad_in_main_grad = False
        else:
            p.main_grad.add_(p.grad)
        p.grad = None
        self._count[id(p)] += 1
        if self._count[id(p)] < self._expected:
            return
        bucket = self.bucket_of[p]
        bucket.pending.discard(id(p))
        if not bucket.pending and self.overlap and not bucket.deferred:
            self._launch(bucket)

    def _launch(self, bucket: Bucket) -> None:
        if bucket.group is None or bucket.handle is not None:
            return
        data = self.grad_data[bucket.start:bucket.end]
        if self.shard:
            s, e = bucket.shard()
            src = data if data.is_cuda else data.clone()  # NCCL reduces in place; gloo wants a copy
            bucket.handle = _reduce_scatter_single(self.grad_data[s:e], src, group=bucket.group, async_op=True)
        else:
            bucket.handle = dist.all_reduce(data, group=bucket.group, async_op=True)

    def finish(self, before_deferred=None) -> None:
        """Wait for every bucket's reduction (launching those whose grads never arrived).

        `before_deferred(params)` runs on the deferred parameters before their buckets go out.
        """
        late = [p for b in self.buckets if b.deferred for p in b.params]
        if late and before_deferred is not None:
            before_deferred(late)
        for bucket in self.buckets:
            self._launch(bucket)
        for bucket in self.buckets:
            if bucket.handle is not None:
                bucket.handle.wait()
                bucket.handle = None

    def gather_params(self) -> None:
        """After a sharded update: all-gather every bucket's updated shards into all ranks."""
        if not self.shard:
            return
        handles = []
        for bucket in self.buckets:
            if bucket.group is None:
                continue
            s, e = bucket.shard()
            mine = self.param_data[s:e]
            mine = mine if mine.is_cuda else mine.clone()
            handles.append(_all_gather_single(self.param_data[bucket.start:bucket.end], mine,
                                              group=bucket.group, async_op=True))
        for h in handles:
            h.wait()
