"""One optimizer step of training, apart from the entry point.

`TrainingStep` holds what a layout trains with — this rank's model chunks, the fp32 gradient
buffers, the (distributed) optimizer and the pipeline runner — and runs one global batch through
them: micro-batches forward and backward, gradients reduced, the loss summed over the ranks, a
clipped AdamW update unless the loss or the gradient norm is not finite. `train.py` loops over it;
`bench/train_throughput.py` times the very same step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_qwen2.config import Config
from megatron_qwen2.data.batch import Batch
from megatron_qwen2.engine.distributed_optimizer import MixedPrecisionOptimizer
from megatron_qwen2.engine.grad_buffer import GradBuffer
from megatron_qwen2.engine.pipeline import PipelineRunner, build_model_chunks
from megatron_qwen2.engine.schedule import check_microbatches
from megatron_qwen2.engine.tp_grads import sync_tp_grads
from megatron_qwen2.model.moe import set_moe_loss_scale
from megatron_qwen2.parallel import Topology


@dataclass
class StepOutcome:
    loss: float  # mean token loss of the global batch (the same on every rank)
    aux_loss: float  # MoE load-balancing loss, mean over micro-batches (0 for dense models)
    grad_norm: float  # before clipping
    skipped: bool  # a non-finite loss or grad norm: weights and Adam state were left as they were


def sum_tied_embedding_grads(params: list[torch.nn.Parameter], topo: Topology) -> None:
    """First and last stage each hold the tied embedding: give both the sum of their gradients."""
    group = topo.group("embedding")
    if group is not None:
        for p in params:
            dist.all_reduce(p.main_grad, group=group)


class TrainingStep:
    """This rank's share of the model and its optimizer, and one optimizer step over a global batch.

    The weights are initialised from `train.seed` on the CPU (the same model in every layout) and
    then moved to `device`; `init_on_device` draws them on the device instead (faster for large
    models, another model than the CPU draw: for benchmarks).
    """

    def __init__(self, cfg: Config, topo: Topology, device: torch.device, init_on_device: bool = False):
        t = cfg.train
        self.cfg, self.topo, self.device = cfg, topo, device
        self.dtype = torch.bfloat16 if t.dtype == "bf16" else torch.float32
        with torch.device(device if init_on_device else "cpu"):
            self.chunks = build_model_chunks(cfg.model, cfg.parallel, topo)
            for chunk in self.chunks:
                chunk.init_weights(t.seed)
        for chunk in self.chunks:
            chunk.to(device=device, dtype=self.dtype)
        self.params = [p for chunk in self.chunks for p in chunk.parameters()]
        tied = [p for chunk in self.chunks for n, p in chunk.named_parameters() if n == "embedding.weight"
                and cfg.model.tie_word_embeddings and topo.pp > 1]
        # Parameters are replicated over dp and cp: their gradients are summed (and, with the
        # distributed optimizer, sharded) over dp x cp; expert parameters over expert_dp x cp.
        self.grads = GradBuffer(self.params, topo.group("dp_cp"), bucket_size=cfg.parallel.bucket_size,
                                shard=cfg.parallel.distributed_optimizer, overlap=cfg.parallel.overlap_grad_reduce,
                                deferred=tied, expert_dp_group=topo.group("expert_dp_cp"))
        self.optimizer = MixedPrecisionOptimizer(self.grads, cfg.optim, topo.group("tp"),
                                                 norm_groups=[topo.group("mp")], ep_group=topo.group("ep"),
                                                 cp_group=topo.group("cp"))
        self.runner = PipelineRunner(self.chunks, cfg.model, topo, t.micro_batch_size, t.seq_length, self.dtype,
                                     device)
        for chunk in self.chunks:
            chunk.set_recompute(t.recompute, t.recompute_num_layers)
        self.total_micro = t.global_batch_size // t.micro_batch_size  # over all dp ranks
        self.local_samples = t.global_batch_size // topo.dp
        check_microbatches(topo.pp, topo.vpp, self.total_micro // topo.dp)

    def _microbatches(self, batch: Batch) -> list[Batch]:
        """This dp rank's rows of the global batch, on the device, cut into micro-batches."""
        rank = self.topo.dp_rank
        mine = batch[rank * self.local_samples:(rank + 1) * self.local_samples].to(self.device)
        return mine.split(self.cfg.train.micro_batch_size)

    def _sum_over_ranks(self, sums: torch.Tensor) -> torch.Tensor:
        """Only the last pipeline stage saw the losses: sum them over stages, data-parallel ranks and
        the cp ranks' shares of the sequence (on the device: NCCL reduces device tensors)."""
        for group in (self.topo.group("pp"), self.topo.group("dp_cp")):
            if group is not None:
                dist.all_reduce(sums, group=group)
        return sums

    def validation_loss(self, batch: Batch) -> float:
        """Mean token loss of the global batch `batch`, forwards only (no gradients, no update)."""
        result = self.runner.forward_only(self._microbatches(batch), loss_scale=1.0 / self.total_micro, aux_coef=0.0,
                                          num_tokens=batch.num_loss_tokens())
        return self._sum_over_ranks(result.loss_sum.reshape(1)).item() / self.total_micro

    def __call__(self, batch: Batch, lr: float) -> StepOutcome:
        """One optimizer step on the global batch `batch` ([gbs, s+1] rows, the same on every rank)."""
        topo, total_micro = self.topo, self.total_micro
        num_tokens = batch.num_loss_tokens()  # the loss is a mean over the global batch's counted labels
        micro = self._microbatches(batch)
        self.grads.start_step(len(micro))
        # Every micro-batch of the global batch weighs 1/total_micro, whichever rank runs it.
        for chunk in self.chunks:
            set_moe_loss_scale(chunk, 1.0 / total_micro)
        with torch.profiler.record_function("forward_backward"):
            result = self.runner.run(micro, loss_scale=1.0 / total_micro, aux_coef=self.cfg.model.aux_loss_coef,
                                     num_tokens=num_tokens)
        with torch.profiler.record_function("grad_finish"):
            self.grads.finish(before_deferred=lambda ps: sum_tied_embedding_grads(ps, topo))
            sync_tp_grads(self.params, topo.group("tp"))
            # Summed over the ranks before the update, so that a NaN can stop it.
            sums = self._sum_over_ranks(torch.stack([result.loss_sum, result.aux_sum])).cpu()
        loss_finite = bool(torch.isfinite(sums).all())  # the same on every rank
        with torch.profiler.record_function("optimizer"):
            # A non-finite loss or grad norm leaves weights and Adam state as they were.
            grad_norm = self.optimizer.step(lr, skip_nonfinite=True) if loss_finite else self.optimizer.grad_norm()
        return StepOutcome(loss=sums[0].item() / total_micro, aux_loss=sums[1].item() / total_micro,
                           grad_norm=grad_norm, skipped=not (loss_finite and math.isfinite(grad_norm)))
