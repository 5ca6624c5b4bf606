"""Pipeline parallelism: stage layout, model chunks, and the runner that executes a schedule.

Each pipeline rank holds `vpp` model chunks; chunk c of rank r is virtual stage c * pp + r.
The runner walks this rank's action list (`schedule.py`). A forward receives its input from
the previous virtual stage (the rank before, wrapping around), runs the chunk and sends the
output on; a backward receives the output gradient from the next stage, back-propagates and
sends the input gradient back. Sends are asynchronous (waited for at the end of the step);
only receives block, just before the action that needs them. Each direction between two
neighbours has its own process group, so that under NCCL, which runs the operations of one
communicator in order, a message is never stuck behind one going the other way. With that,
the schedule can only deadlock if its dependencies do (`schedule.simulate` checks they do
not), and messages between two ranks are consumed in the order they are sent (tested).

Between stages travel the hidden states [s(/tp), b, h] and, for MoE models, the running
router sums [2, E] of the load-balancing loss; their shapes are known before the step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from megatron_qwen2.config import ModelConfig, ParallelConfig
from megatron_qwen2.model import Qwen2Model
from megatron_qwen2.parallel.schedule import Action, build_schedule
from megatron_qwen2.parallel.topology import Topology


def stage_layers(cfg: ModelConfig, par: ParallelConfig) -> list[list[int]]:
    """Global layer indices of each virtual stage (pp * vpp of them, in pipeline order)."""
    stages = par.pp * par.vpp
    if par.pp_layout is not None:
        counts = list(par.pp_layout)
        if len(counts) != stages or any(c < 0 for c in counts) or sum(counts) != cfg.num_layers:
            raise ValueError(f"parallel.pp_layout={counts} must give {stages} non-negative layer counts "
                             f"(pp={par.pp} x vpp={par.vpp}) summing to model.num_layers={cfg.num_layers}")
    else:
        if cfg.num_layers % stages != 0:
            raise ValueError(f"model.num_layers={cfg.num_layers} is not divisible by pp*vpp={par.pp}*{par.vpp}; "
                             "set parallel.pp_layout to choose the layers of each stage")
        counts = [cfg.num_layers // stages] * stages
    bounds = [sum(counts[:i]) for i in range(stages + 1)]
    return [list(range(bounds[i], bounds[i + 1])) for i in range(stages)]


def build_model_chunks(cfg: ModelConfig, par: ParallelConfig, topo: Topology) -> list[Qwen2Model]:
    """This rank's model chunks; chunk c is virtual stage c * pp + pp_rank."""
    layers = stage_layers(cfg, par)
    last = par.pp * par.vpp - 1
    chunks = []
    for c in range(par.vpp):
        v = c * par.pp + topo.pp_rank
        chunks.append(Qwen2Model(cfg, topo, layer_ids=layers[v], pre_process=v == 0, post_process=v == last))
    return chunks


@dataclass
class StepResult:
    loss_sum: torch.Tensor  # sum over this rank's micro-batches of the mean token loss (last stage only)
    aux_sum: torch.Tensor  # same for the MoE aux loss


class PipelineRunner:
    """Runs forward and backward of every micro-batch on this rank's chunks, following the schedule."""

    def __init__(self, chunks: list[Qwen2Model], cfg: ModelConfig, topo: Topology, micro_batch_size: int,
                 seq_length: int, dtype: torch.dtype, device: torch.device):
        self.chunks, self.cfg, self.topo = chunks, cfg, topo
        self.pp, self.vpp = topo.pp, len(chunks)
        self.last_stage = self.pp * self.vpp - 1
        if topo.pp > 1:
            ranks = next(r for r in topo.rank_lists("pp") if topo.rank in r)
            self.next_rank = ranks[(topo.pp_rank + 1) % topo.pp]
            self.prev_rank = ranks[(topo.pp_rank - 1) % topo.pp]
        s_local = seq_length // topo.tp if topo.sequence_parallel else seq_length
        # What travels between stages, identical for activations and their gradients.
        self.specs = [((s_local, micro_batch_size, cfg.hidden_size), dtype)]
        if cfg.is_moe:
            self.specs.append(((2, cfg.num_experts), torch.float32))
        self.device = device

    def _stage(self, chunk: int) -> int:
        return chunk * self.pp + self.topo.pp_rank

    def _needs_recv(self, a: Action) -> Optional[int]:
        """The rank this action receives from, or None."""
        stage = self._stage(a.chunk)
        if a.kind == "F":
            return self.prev_rank if stage > 0 else None
        return self.next_rank if stage < self.last_stage else None

    def _send(self, tensors: list[torch.Tensor], peer: int) -> None:
        group = self.topo.p2p[(self.topo.rank, peer)]
        for t in tensors:
            t = t.contiguous()
            self._pending.append((dist.isend(t, dst=peer, group=group), t))  # keep t alive until sent

    def _recv(self, peer: int) -> list[torch.Tensor]:
        group = self.topo.p2p[(peer, self.topo.rank)]
        tensors = [torch.empty(shape, dtype=dtype, device=self.device) for shape, dtype in self.specs]
        for t in tensors:
            dist.irecv(t, src=peer, group=group).wait()
        return tensors

    def run(self, microbatches: list[torch.Tensor], loss_scale: float, aux_coef: float) -> StepResult:
        """Forward and backward of every micro-batch ([mbs, s+1] token rows) on this rank."""
        schedule = build_schedule(self.pp, self.vpp, self.topo.pp_rank, len(microbatches))
        saved: dict[tuple[int, int], tuple] = {}  # (microbatch, chunk) -> (inputs, outputs)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        aux_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self._pending = []
        for a in schedule:
            stage = self._stage(a.chunk)
            peer = self._needs_recv(a) if self.pp > 1 else None
            incoming = self._recv(peer) if peer is not None else None
            if a.kind == "F":
                mb = microbatches[a.microbatch]
                position_ids = torch.arange(mb.shape[1] - 1, device=mb.device).expand(mb.shape[0], -1)
                if stage == 0:
                    inputs, x, sums = [], mb[:, :-1], None
                else:
                    inputs = [t.requires_grad_() for t in incoming]
                    x, sums = inputs[0], (inputs[1] if self.cfg.is_moe else None)
                labels = mb[:, 1:] if stage == self.last_stage else None
                out = self.chunks[a.chunk].forward_stage(x, position_ids, labels, sums)
                if stage == self.last_stage:
                    loss = out.token_loss.mean()
                    loss_sum += loss.detach()
                    if out.aux_loss is not None:
                        aux_sum += out.aux_loss.detach()
                        loss = loss + aux_coef * out.aux_loss
                    outputs = [loss * loss_scale]
                else:
                    outputs = [out[0]] + ([out[1]] if self.cfg.is_moe else [])
                    self._send([t.detach() for t in outputs], self.next_rank)
                saved[(a.microbatch, a.chunk)] = (inputs, outputs)
            else:
                inputs, outputs = saved.pop((a.microbatch, a.chunk))
                grads = None if stage == self.last_stage else incoming
                pairs = [(o, g) for o, g in zip(outputs, grads or [None] * len(outputs)) if o.requires_grad]
                torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs] if grads else None)
                if stage > 0:
                    self._send([t.grad if t.grad is not None else torch.zeros_like(t) for t in inputs], self.prev_rank)
        for work, _ in self._pending:
            work.wait()
        self._pending = []
        return StepResult(loss_sum=loss_sum, aux_sum=aux_sum)
