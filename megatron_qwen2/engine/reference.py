"""The frozen reference model of DPO (docs/architecture.md, "DPO")."""

from __future__ import annotations

from dataclasses import replace

import torch

from megatron_qwen2.config import Config
from megatron_qwen2.data.batch import Batch
from megatron_qwen2.engine.pipeline import PipelineRunner, seeded_chunks
from megatron_qwen2.parallel.topology import Topology


class ReferenceModel:
    """The frozen reference: this rank's chunks of the same layout as the policy, in train.dtype, without
    gradients or optimizer state, and a pipeline runner of their own that runs forwards only.

    Its weights start as the policy's seeded initialisation (drawn on `device` with `init_on_device`,
    as TrainingStep's); train.py loads dpo.reference or train.init_from into `chunks`
    (checkpoint.load_weights)."""

    def __init__(self, cfg: Config, topo: Topology, device: torch.device, dtype: torch.dtype,
                 init_on_device: bool = False):
        t = cfg.train
        self.chunks = seeded_chunks(cfg.model, cfg.parallel, topo, t.seed, device, dtype, init_on_device)
        for chunk in self.chunks:
            chunk.requires_grad_(False)
            chunk.eval()
        self.runner = PipelineRunner(self.chunks, cfg.model, topo, t.micro_batch_size, t.seq_length, dtype, device)

    def with_reference_logps(self, micro: list[Batch]) -> list[Batch]:
        """The micro-batches with the reference's response log-probabilities attached (on the last
        pipeline stage; the other stages, which compute no loss, get zeros)."""
        logps = self.runner.forward_only(micro, loss_scale=1.0, aux_coef=0.0).sequence_logps
        return [replace(mb, reference_logps=logps.get(i, torch.zeros(*mb.pairs.shape, 2, dtype=torch.float64,
                                                                        device=mb.tokens.device)))
                for i, mb in enumerate(micro)]
