"""Pipeline parallelism: stage layout, model chunks, and the runner that executes a schedule.

Each pipeline rank holds `vpp` model chunks; chunk c of rank r is virtual stage c * pp + r.
The runner walks this rank's action list (`schedule.py`). A forward receives its input from
the previous virtual stage (the rank before, wrapping around), runs the chunk and sends the
output on; a backward receives the output gradient from the next stage, back-propagates and
sends the input gradient back. Sends are asynchronous (each tensor dropped once its send has
completed, the rest waited for at the end of the step);
only receives block, just before the action that needs them. Each direction between two
neighbours has its own process group, so that under NCCL, which runs the operations of one
communicator in order, a message is never stuck behind one going the other way. With that,
the schedule can only deadlock if its dependencies do (`schedule.simulate` checks they do
not), and messages between two ranks are consumed in the order they are sent (tested).

Between stages travel the hidden states [s(/tp), b, h] and, for MoE models, the running
router sums [2, E] of the load-balancing loss; their shapes are known before the step. Each
stage keeps the MoE statistics its chunks return (`StepResult.moe_load`) and back-propagates its
own layers' z-loss.

Context parallelism: each cp rank runs every micro-batch on its share of the sequence (chunks r
and 2cp-1-r of each row, parallel/cp.py). The runner cuts inputs, labels, loss mask, positions
(global, or reset per document) and document ids the same way before the first stage, so the
hidden states between stages are [s/cp(/tp), b, h].

Preference rows (DPO, engine/dpo.py): the last stage sums each row's token losses into its chosen
and rejected response's log-probability (summed over cp) and, given a DpoConfig, the micro-batch's
objective is the sum of its pairs' losses / the pairs of the global batch, instead of the token loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch
import torch.distributed as dist

from megatron_qwen2.config import DpoConfig, ModelConfig, ParallelConfig
from megatron_qwen2.data.batch import Batch, as_batch
from megatron_qwen2.engine.dpo import pair_terms, response_logps
from megatron_qwen2.engine.schedule import Action, build_schedule
from megatron_qwen2.model import Qwen2Model
from megatron_qwen2.model.moe import MoELoad, add_moe_stats, z_loss_term
from megatron_qwen2.ops.fp8 import Fp8
from megatron_qwen2.parallel.cp import split_sequence
from megatron_qwen2.parallel.topology import Topology


def stage_layers(cfg: ModelConfig, par: ParallelConfig) -> list[list[int]]:
    """Global layer indices of each virtual stage (pp * vpp of them, in pipeline order)."""
    stages = par.pp * par.vpp
    counts = par.layer_counts(cfg.num_layers)
    bounds = [sum(counts[:i]) for i in range(stages + 1)]
    return [list(range(bounds[i], bounds[i + 1])) for i in range(stages)]


def build_model_chunks(cfg: ModelConfig, par: ParallelConfig, topo: Topology,
                       fp8: Optional[Fp8] = None) -> list[Qwen2Model]:
    """This rank's model chunks; chunk c is virtual stage c * pp + pp_rank (their projections in FP8
    when `fp8` is given)."""
    layers = stage_layers(cfg, par)
    last = par.pp * par.vpp - 1
    chunks = []
    for c in range(par.vpp):
        v = c * par.pp + topo.pp_rank
        chunks.append(Qwen2Model(cfg, topo, layer_ids=layers[v], pre_process=v == 0, post_process=v == last,
                                 fp8=fp8))
    return chunks


def seeded_chunks(cfg: ModelConfig, par: ParallelConfig, topo: Topology, seed: int, device: torch.device,
                  dtype: torch.dtype, init_on_device: bool = False, fp8: Optional[Fp8] = None) -> list[Qwen2Model]:
    """`build_model_chunks` with the weights initialised from `seed` on the CPU (the same model in
    every layout), or on `device` with `init_on_device` (faster, another draw), then moved to
    `device` in `dtype`."""
    with torch.device(device if init_on_device else "cpu"):
        chunks = build_model_chunks(cfg, par, topo, fp8)
        for chunk in chunks:
            chunk.init_weights(seed)
    for chunk in chunks:
        chunk.to(device=device, dtype=dtype)
    return chunks


@dataclass
class StepResult:
    # Sum over this rank's micro-batches of each one's token-loss term / loss_scale (last stage only):
    # summed over all ranks and multiplied by loss_scale, the global batch's loss.
    loss_sum: torch.Tensor
    aux_sum: torch.Tensor  # sum over this rank's micro-batches of the MoE aux loss (on cp rank 0 only)
    # This rank's MoE layers (every stage's), by global layer index: load, drops and z-loss summed
    # over this rank's micro-batches, each counted once.
    moe_load: dict[int, MoELoad] = field(default_factory=dict)
    # Preference rows, last stage: each micro-batch's response log-probabilities [mbs, slots, 2]
    # (chosen, rejected; detached) by micro-batch index, and with a DpoConfig the sums of its pairs' rewards and
    # right rankings ([3], PairTerms.metric_sums) over this rank's micro-batches (on cp rank 0 only).
    sequence_logps: dict[int, torch.Tensor] = field(default_factory=dict)
    dpo_sums: Optional[torch.Tensor] = None


@dataclass
class LocalMicroBatch:
    """What this rank's stages read of a micro-batch: its share of the sequence ([b, s/cp] each)."""

    inputs: torch.Tensor  # token ids
    labels: torch.Tensor
    positions: torch.Tensor  # RoPE positions
    document_ids: Optional[torch.Tensor]
    loss_mask: Optional[torch.Tensor]
    counted: Union[int, torch.Tensor]  # labels of the whole micro-batch (all cp shares) that count in the loss
    # Preference rows (Batch.pairs, .pair_side, .reference_logps): only pair_side is cut over cp.
    pairs: Optional[torch.Tensor]
    pair_side: Optional[torch.Tensor]
    reference_logps: Optional[torch.Tensor]


def local_microbatch(mb: Batch, cp: int, cp_rank: int) -> LocalMicroBatch:
    """Cut a micro-batch to this cp rank's share of every row (the identity when cp == 1)."""
    def share(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return None if t is None else split_sequence(t, cp, cp_rank, dim=1)

    return LocalMicroBatch(inputs=share(mb.tokens[:, :-1]), labels=share(mb.tokens[:, 1:]),
                           positions=share(mb.positions()), document_ids=share(mb.document_ids),
                           loss_mask=share(mb.loss_mask),
                           counted=mb.loss_mask.sum() if mb.loss_mask is not None else mb.tokens[:, 1:].numel(),
                           pairs=mb.pairs, pair_side=share(mb.pair_side), reference_logps=mb.reference_logps)


class PipelineRunner:
    """Runs forward and backward of every micro-batch on this rank's chunks, following the schedule."""

    def __init__(self, chunks: list[Qwen2Model], cfg: ModelConfig, topo: Topology, micro_batch_size: int,
                 seq_length: int, dtype: torch.dtype, device: torch.device):
        self.chunks, self.cfg, self.topo = chunks, cfg, topo
        self.pp, self.vpp = topo.pp, len(chunks)
        self._pending: list = []  # (work, tensor, (microbatch, chunk) of an activation or None)
        self.max_pending_activations = 0
        self.last_stage = self.pp * self.vpp - 1
        if topo.pp > 1:
            ranks = next(r for r in topo.rank_lists("pp") if topo.rank in r)
            self.next_rank = ranks[(topo.pp_rank + 1) % topo.pp]
            self.prev_rank = ranks[(topo.pp_rank - 1) % topo.pp]
        s_local = seq_length // topo.cp  # divisible: Config.validate, and split_sequence at the first step
        s_local = s_local // topo.tp if topo.sequence_parallel else s_local
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

    def _send(self, tensors: list[torch.Tensor], peer: int, key: Optional[tuple[int, int]] = None) -> None:
        """isend each tensor to `peer`; `key` (microbatch, chunk) marks a forward activation."""
        group = self.topo.p2p[(self.topo.rank, peer)]
        for t in tensors:
            t = t.contiguous()
            self._pending.append((dist.isend(t, dst=peer, group=group), t, key))  # keep t alive until sent
        self.max_pending_activations = max(self.max_pending_activations,
                                           sum(k is not None for _, _, k in self._pending))

    def _release_sent(self, done: Optional[tuple[int, int]] = None) -> None:
        """Drop the sends that have completed, so their tensors are freed as the step goes rather than
        at its end. The activation of `done` (microbatch, chunk) has certainly arrived: its gradient
        came back from the next stage, which computed it from that activation, so waiting for it
        returns at once (every backend); other sends go when the backend reports them complete
        (NCCL does as soon as they are; gloo only when waited for, at the step's end)."""
        kept = []
        for work, t, key in self._pending:
            if done is not None and key == done:
                work.wait()
            elif not work.is_completed():
                kept.append((work, t, key))
        self._pending = kept

    def _recv(self, peer: int) -> list[torch.Tensor]:
        group = self.topo.p2p[(peer, self.topo.rank)]
        tensors = [torch.empty(shape, dtype=dtype, device=self.device) for shape, dtype in self.specs]
        for t in tensors:
            dist.irecv(t, src=peer, group=group).wait()
        return tensors

    @staticmethod
    def _token_loss_term(token_loss: torch.Tensor, mask: Optional[torch.Tensor], loss_scale: float,
                         num_tokens: Optional[int], counted: Union[int, torch.Tensor]) -> torch.Tensor:
        """This rank's share of the global batch's token loss (see `run`); `counted`: the labels of the
        whole micro-batch that count, over all cp shares, so the cp ranks' terms add up to the micro-batch's."""
        total = token_loss.sum() if mask is None else (token_loss * mask).sum()
        if num_tokens is not None:
            return total / max(num_tokens, 1)  # a global batch without counted labels contributes 0
        counted = counted.clamp(min=1) if isinstance(counted, torch.Tensor) else max(counted, 1)
        return total / counted * loss_scale

    def run(self, microbatches: Sequence[Union[Batch, torch.Tensor]], loss_scale: float, aux_coef: float,
            num_tokens: Optional[int] = None, forward_only: bool = False, dpo: Optional[DpoConfig] = None,
            num_pairs: int = 1) -> StepResult:
        """Forward and backward of every micro-batch (a Batch, or bare [mbs, s+1] token rows) on this rank.

        A micro-batch's objective is its token-loss term + loss_scale * aux_coef * aux loss, and on
        every stage + (model.moe_z_loss_coef * its MoE layers' z-losses) * loss_scale / cp. The
        token-loss term is the sum of its masked token losses / num_tokens when num_tokens (the
        unmasked labels of the whole global batch) is given, so every counted token of the global
        batch weighs the same however the micro-batches and ranks cut it (Megatron's
        normalisation); without num_tokens it is loss_scale * the micro-batch's masked mean.

        With `dpo` (preference rows with reference_logps) the token-loss term is replaced by the sum of
        the micro-batch's pair losses / num_pairs (the pairs of the whole global batch); every cp rank
        computes it from the cp-summed log-probabilities, and loss_sum counts it on cp rank 0.
        """
        cp, cp_rank = self.topo.cp, self.topo.cp_rank
        microbatches = [local_microbatch(as_batch(mb), cp, cp_rank) for mb in microbatches]
        schedule = build_schedule(self.pp, self.vpp, self.topo.pp_rank, len(microbatches))
        if forward_only:  # validation: the forwards alone (dropping actions only removes waits: no deadlock)
            schedule = [a for a in schedule if a.kind == "F"]
        saved: dict[tuple[int, int], tuple] = {}  # (microbatch, chunk) -> (inputs, outputs)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        aux_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        moe_load: dict[int, MoELoad] = {}
        sequence_logps: dict[int, torch.Tensor] = {}
        dpo_sums = torch.zeros(3, dtype=torch.float64, device=self.device) if dpo is not None else None
        self._pending = []
        self.max_pending_activations = 0  # the most activation sends outstanding at once in this step
        for a in schedule:
            stage = self._stage(a.chunk)
            peer = self._needs_recv(a) if self.pp > 1 else None
            incoming = self._recv(peer) if peer is not None else None
            # A backward that received its output gradient: the activation it was computed from has arrived.
            self._release_sent(done=(a.microbatch, a.chunk) if a.kind == "B" and incoming is not None else None)
            if a.kind == "F":
                mb = microbatches[a.microbatch]
                if stage == 0:
                    inputs, x, sums = [], mb.inputs, None
                else:
                    inputs = [t.requires_grad_() for t in incoming]
                    x, sums = inputs[0], (inputs[1] if self.cfg.is_moe else None)
                labels = mb.labels if stage == self.last_stage else None
                out = self.chunks[a.chunk].forward_stage(x, mb.positions, labels, sums,
                                                         document_ids=mb.document_ids)
                moe_load = add_moe_stats(moe_load, out.moe_stats)
                # Each cp rank's z-losses are means over its share of the tokens: each adds 1/cp of them.
                z_loss = z_loss_term(out.moe_stats, self.cfg.moe_z_loss_coef, loss_scale / cp)
                if stage == self.last_stage:
                    logps = None
                    if mb.pair_side is not None:
                        logps = response_logps(out.token_loss, mb.pair_side, mb.pairs.shape[1], self.topo.groups.cp.pg)
                        sequence_logps[a.microbatch] = logps.detach()
                    if dpo is not None:
                        if logps is None or mb.reference_logps is None:
                            raise ValueError("a DPO step needs preference rows with the reference's log-probabilities")
                        terms = pair_terms(logps, mb.reference_logps, mb.pairs, dpo)
                        loss = terms.losses.sum() / num_pairs
                        if cp_rank == 0:  # every cp rank computed the same pair losses: count them once
                            loss_sum += loss.detach() / loss_scale
                            dpo_sums += terms.metric_sums()
                    else:
                        loss = self._token_loss_term(out.token_loss, mb.loss_mask, loss_scale, num_tokens, mb.counted)
                        loss_sum += loss.detach() / loss_scale
                    if out.aux_loss is not None:
                        # Every cp rank computes the whole micro-batch's aux loss (router sums summed
                        # over cp, model/moe.py) and back-propagates it into its own tokens; count it once.
                        if cp_rank == 0:
                            aux_sum += out.aux_loss.detach()
                        loss = loss + loss_scale * aux_coef * out.aux_loss
                    if z_loss is not None:
                        loss = loss + z_loss
                    outputs = [loss]
                else:
                    outputs = [out.hidden] + ([out.router_sums] if self.cfg.is_moe else [])
                    self._send([t.detach() for t in outputs], self.next_rank, key=(a.microbatch, a.chunk))
                    if z_loss is not None:  # this stage's part of the objective, not sent on
                        outputs.append(z_loss)
                if not forward_only:
                    saved[(a.microbatch, a.chunk)] = (inputs, outputs)
            else:
                inputs, outputs = saved.pop((a.microbatch, a.chunk))
                grads = [] if stage == self.last_stage else incoming
                # Outputs past the received gradients are scalar objective terms (gradient None: 1).
                grads = grads + [None] * (len(outputs) - len(grads))
                pairs = [(o, g) for o, g in zip(outputs, grads) if o.requires_grad]
                torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
                if stage > 0:
                    self._send([t.grad if t.grad is not None else torch.zeros_like(t) for t in inputs], self.prev_rank)
        for work, _, _ in self._pending:
            work.wait()
        self._pending = []
        return StepResult(loss_sum=loss_sum, aux_sum=aux_sum, moe_load=moe_load, sequence_logps=sequence_logps,
                          dpo_sums=dpo_sums)

    @torch.no_grad()
    def forward_only(self, microbatches: Sequence[Union[Batch, torch.Tensor]], loss_scale: float, aux_coef: float,
                     num_tokens: Optional[int] = None, dpo: Optional[DpoConfig] = None,
                     num_pairs: int = 1) -> StepResult:
        """The losses of `run` without gradients or backward (validation, the DPO reference)."""
        return self.run(microbatches, loss_scale, aux_coef, num_tokens=num_tokens, forward_only=True, dpo=dpo,
                        num_pairs=num_pairs)
