"""One optimizer step of training, apart from the entry point.

`TrainingStep` holds what a layout trains with — this rank's model chunks, the fp32 gradient
buffers, the (distributed) optimizer and the pipeline runner — and runs one global batch through
them: micro-batches forward and backward, gradients reduced, the loss summed over the ranks, a
clipped AdamW update unless the loss or the gradient norm is not finite. `train.py` loops over it;
`bench/train_throughput.py` times the very same step.

With preference data (data.format=preference) the step trains with DPO: each micro-batch gets the
reference model's response log-probabilities (from the frozen `ReferenceModel`, or precomputed and
carried by the batch) and the objective is the mean pair loss of the global batch (engine/dpo.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

from megatron_qwen2.config import Config
from megatron_qwen2.data.batch import Batch
from megatron_qwen2.engine.distributed_optimizer import MixedPrecisionOptimizer
from megatron_qwen2.engine.dpo import DpoMetrics
from megatron_qwen2.engine.grad_buffer import GradBuffer, grad_of
from megatron_qwen2.engine.pipeline import PipelineRunner, seeded_chunks
from megatron_qwen2.engine.reductions import GradientReductions
from megatron_qwen2.engine.reference import ReferenceModel
from megatron_qwen2.engine.tp_grads import sync_tp_grads
from megatron_qwen2.errors import ConfigError
from megatron_qwen2.model.moe import MoELoad
from megatron_qwen2.ops.fp8 import Fp8, Fp8Weights, fp8_unsupported, recipe
from megatron_qwen2.parallel import Topology
from megatron_qwen2.parallel.topology import Group


@dataclass
class StepOutcome:
    loss: float  # mean token loss of the global batch (the same on every rank)
    aux_loss: float  # MoE load-balancing loss, mean over micro-batches (0 for dense models)
    grad_norm: float  # before clipping
    skipped: bool  # a non-finite loss or grad norm: weights and Adam state were left as they were
    # This rank's MoE layers, by global layer index: load, drops and z-loss of this rank's micro-batches
    # (metrics: model.moe.moe_load_metrics sums them over dp x cp).
    moe_load: dict[int, MoELoad] = field(default_factory=dict)
    dpo: Optional[DpoMetrics] = None  # DPO steps: rewards and accuracy over the global batch's pairs


def sum_tied_embedding_grads(params: list[torch.nn.Parameter], group: Group) -> None:
    """First and last stage each hold the tied embedding: give both the sum of their gradients."""
    if group.pg is not None:
        for p in params:
            dist.all_reduce(grad_of(p), group=group.pg)


class TrainingStep:
    """This rank's share of the model and its optimizer, and one optimizer step over a global batch.

    The weights are initialised from `train.seed` on the CPU (the same model in every layout) and
    then moved to `device`; `init_on_device` draws them on the device instead (faster for large
    models, another model than the CPU draw: for benchmarks).

    With train.fp8 the projections' GEMMs run in FP8 from weight copies quantised at their first use
    in each step or validation (`Fp8Weights`, cleared when they begin): once per optimizer step.
    """

    def __init__(self, cfg: Config, topo: Topology, device: torch.device, init_on_device: bool = False):
        t = cfg.train
        self.cfg, self.topo, self.device = cfg, topo, device
        self.dtype = torch.bfloat16 if t.dtype == "bf16" else torch.float32
        fp8_recipe = recipe(t.fp8)
        unsupported = None if fp8_recipe is None else fp8_unsupported(device)
        if unsupported:
            raise ConfigError(f"train.fp8={t.fp8}: {unsupported}; use train.fp8=none")
        self.fp8 = None if fp8_recipe is None else Fp8(fp8_recipe, Fp8Weights())
        self.chunks = seeded_chunks(cfg.model, cfg.parallel, topo, t.seed, device, self.dtype, init_on_device,
                                    self.fp8)
        self.params = [p for chunk in self.chunks for p in chunk.parameters()]
        tied = [p for chunk in self.chunks for n, p in chunk.named_parameters() if n == "embedding.weight"
                and cfg.model.tie_word_embeddings and topo.pp > 1]
        self.reductions = GradientReductions.of(topo)
        self.grads = GradBuffer(self.params, self.reductions, bucket_size=cfg.parallel.bucket_size,
                                shard=cfg.parallel.distributed_optimizer, overlap=cfg.parallel.overlap_grad_reduce,
                                deferred=tied)
        self.optimizer = MixedPrecisionOptimizer(self.grads, cfg.optim)
        self.runner = PipelineRunner(self.chunks, cfg.model, topo, t.micro_batch_size, t.seq_length, self.dtype,
                                     device)
        for chunk in self.chunks:
            chunk.set_recompute(t.recompute, t.recompute_num_layers)
        self.total_micro = t.global_batch_size // t.micro_batch_size  # over all dp ranks
        self.local_samples = t.global_batch_size // topo.dp
        # DPO: the frozen reference in the same layout, unless its log-probabilities come with the data.
        self.reference = (ReferenceModel(cfg, topo, device, self.dtype, init_on_device)
                          if cfg.is_dpo and not cfg.dpo.precompute_reference else None)

    def _weights_changed(self) -> None:
        """The weights may differ from those of the last forward (an update, a checkpoint load):
        FP8 copies are made again at their next use."""
        if self.fp8 is not None:
            self.fp8.weights.clear()

    def _microbatches(self, batch: Batch) -> list[Batch]:
        """This dp rank's rows, on the device, cut into micro-batches (with the reference model's
        log-probabilities under DPO)."""
        if len(batch) != self.local_samples:
            raise ValueError(f"a step takes this data-parallel rank's {self.local_samples} rows of the global "
                             f"batch (SampleDataset.local_batch), got {len(batch)}")
        micro = batch.to(self.device).split(self.cfg.train.micro_batch_size)
        if self.reference is not None:
            with torch.profiler.record_function("reference_forward"):
                micro = self.reference.with_reference_logps(micro)
        return micro

    def _losses(self, micro: list[Batch], batch: Batch, forward_only: bool, aux_coef: float):
        """The runner over this rank's micro-batches and the count its mean is over: the DPO objective
        over the global batch's pairs for preference rows, else the mean over its counted labels."""
        run = self.runner.forward_only if forward_only else self.runner.run
        if self.cfg.is_dpo:
            num_pairs = self._global_count(int(batch.pairs.sum()))
            return run(micro, loss_scale=1.0 / self.total_micro, aux_coef=aux_coef, dpo=self.cfg.dpo,
                       num_pairs=num_pairs), num_pairs
        num_tokens = self._global_count(batch.num_loss_tokens())
        return run(micro, loss_scale=1.0 / self.total_micro, aux_coef=aux_coef, num_tokens=num_tokens), num_tokens

    def _global_count(self, local: int) -> int:
        """A count over this rank's rows (counted labels, pairs) summed over the dp ranks: the whole
        global batch's (the tp, cp and pp ranks of one dp rank hold the same rows)."""
        dp = self.topo.groups.dp
        if dp.pg is None:
            return local
        count = torch.tensor([local], dtype=torch.int64, device=self.device)
        dist.all_reduce(count, group=dp.pg)
        return int(count.item())

    def _sum_over_ranks(self, sums: torch.Tensor) -> torch.Tensor:
        """Only the last pipeline stage saw the losses: sum them over stages, data-parallel ranks and
        the cp ranks' shares of the sequence (on the device: NCCL reduces device tensors)."""
        for group in self.reductions.loss:
            if group.pg is not None:
                dist.all_reduce(sums, group=group.pg)
        return sums

    def validation_loss(self, batch: Batch) -> float:
        """Mean token loss (DPO: mean pair loss) of a global batch, forwards only (no gradients, no
        update); `batch` holds this dp rank's rows of it, as in __call__."""
        self._weights_changed()
        result, _ = self._losses(self._microbatches(batch), batch, forward_only=True, aux_coef=0.0)
        return self._sum_over_ranks(result.loss_sum.reshape(1)).item() / self.total_micro

    @torch.no_grad()
    def global_response_logps(self, batch: Batch, slots: int) -> torch.Tensor:
        """[global_batch_size, slots, 2] float64 on the CPU of every rank: the log-probabilities of the
        chosen and rejected response of each pair slot of each row of a global batch of preference rows
        (PreferenceDataset.make_rows; `slots` at least the most pairs any of its rows holds, absent
        slots 0) under the current weights; `batch` holds this dp rank's rows of it (as in __call__).
        Forwards only."""
        self._weights_changed()
        t, topo = self.cfg.train, self.topo
        micro = batch.to(self.device).split(t.micro_batch_size)
        result = self.runner.forward_only(micro, loss_scale=1.0 / self.total_micro, aux_coef=0.0)
        out = torch.zeros(t.global_batch_size, slots, 2, dtype=torch.float64, device=self.device)
        if result.sequence_logps and topo.tp_rank == 0 and topo.cp_rank == 0:  # one copy of each row: the last stage's
            local = torch.cat([result.sequence_logps[i] for i in range(len(micro))])
            out[topo.dp_rank * self.local_samples:(topo.dp_rank + 1) * self.local_samples, :local.shape[1]] = local
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(out)
        return out.cpu()

    def __call__(self, batch: Batch, lr: float) -> StepOutcome:
        """One optimizer step on a global batch; `batch` holds this dp rank's rows of it ([gbs/dp, s+1]:
        SampleDataset.local_batch), the same on its tp, cp and pp ranks."""
        self._weights_changed()
        total_micro = self.total_micro
        micro = self._microbatches(batch)
        self.grads.start_step(len(micro))
        # Every micro-batch of the global batch weighs 1/total_micro, whichever rank runs it.
        with torch.profiler.record_function("forward_backward"):
            result, count = self._losses(micro, batch, forward_only=False, aux_coef=self.cfg.model.aux_loss_coef)
        with torch.profiler.record_function("grad_finish"):
            self.grads.finish(before_deferred=lambda ps: sum_tied_embedding_grads(ps, self.reductions.tied_embedding))
            sync_tp_grads(self.params, self.reductions.tp.pg)
            # Summed over the ranks before the update, so that a NaN can stop it.
            sums = [result.loss_sum, result.aux_sum] + (list(result.dpo_sums) if result.dpo_sums is not None else [])
            sums = self._sum_over_ranks(torch.stack(sums)).cpu()
        loss_finite = bool(torch.isfinite(sums[:2]).all())  # the same on every rank
        with torch.profiler.record_function("optimizer"):
            # A non-finite loss or grad norm leaves weights and Adam state as they were.
            grad_norm = self.optimizer.step(lr, skip_nonfinite=True) if loss_finite else self.optimizer.grad_norm()
        return StepOutcome(loss=sums[0].item() / total_micro, aux_loss=sums[1].item() / total_micro,
                           grad_norm=grad_norm, skipped=not (loss_finite and math.isfinite(grad_norm)),
                           moe_load=result.moe_load,
                           dpo=DpoMetrics.of(sums[2:], count) if self.cfg.is_dpo else None)
