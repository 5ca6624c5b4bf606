"""The pipeline runner frees sent activations at the backward of their micro-batch: over a step of
many micro-batches only a few are outstanding at once (not all of them until the step's end),
and the step still computes the single-process loss."""

import pytest
import torch

from megatron_qwen2.config import ModelConfig, ParallelConfig
from megatron_qwen2.engine.pipeline import PipelineRunner, build_model_chunks
from megatron_qwen2.model import Qwen2Model
from megatron_qwen2.parallel import Topology
from tests.distributed import run_distributed

MODEL = ModelConfig(hidden_size=64, num_layers=4, num_attention_heads=4, num_kv_heads=2, ffn_hidden_size=128,
                    vocab_size=512)
MICRO, SEQ = 16, 32


def _rows():
    return torch.randint(0, MODEL.vocab_size, (MICRO, SEQ + 1), generator=torch.Generator().manual_seed(3))


def _step(rank, world_size, vpp):
    par = ParallelConfig(pp=world_size, vpp=vpp)
    topo = Topology.build(par, world_size, rank)
    chunks = build_model_chunks(MODEL, par, topo)
    for c in chunks:
        c.init_weights(0)
    runner = PipelineRunner(chunks, MODEL, topo, 1, SEQ, torch.float32, torch.device("cpu"))
    result = runner.run(_rows().split(1), loss_scale=1.0 / MICRO, aux_coef=0.0)
    return result.loss_sum.item(), runner.max_pending_activations


@pytest.mark.parametrize("vpp", [1, 2])
def test_sends_are_released_during_the_step(vpp):
    model = Qwen2Model(MODEL)
    model.init_weights(0)
    rows = _rows()
    expected = sum(model(r[None, :-1], labels=r[None, 1:]).token_loss.mean().item() for r in rows) / MICRO
    results = run_distributed(_step, 2, vpp)
    # rank 1 holds the last virtual stage; loss_sum adds the micro-batches' mean losses
    assert results[1][0] / MICRO == pytest.approx(expected, rel=1e-5)
    # Held to the step's end, every activation a rank sends would be outstanding at once (16 x its
    # chunks that send); released at their backward, at most the micro-batches 1F1B keeps in flight.
    most = [m for _, m in results]
    assert max(most) > 0 and all(m <= 2 * vpp + 2 for m in most), \
        f"{most} activation sends outstanding at once (per rank) over {MICRO} micro-batches"
