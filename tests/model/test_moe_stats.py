"""MoE statistics are values of the forward. The pipeline runner counts each micro-batch once per
MoE layer: a layer recomputed in backward counts what the same step counts without recomputation,
with the same gradients (z-loss included), a validation forward changes nothing, and a pipeline
stage that is not the last counts its own layers and back-propagates their z-loss. The MoE block
keeps nothing between forwards."""

import copy
import dataclasses

import pytest
import torch

from megatron_qwen2.config import ModelConfig, ParallelConfig
from megatron_qwen2.engine.pipeline import PipelineRunner, build_model_chunks
from megatron_qwen2.model import Qwen2Model
from megatron_qwen2.model.moe import moe_load_metrics
from megatron_qwen2.parallel.topology import Topology
from tests.distributed import run_distributed

MOE = ModelConfig(hidden_size=64, num_layers=2, num_attention_heads=4, num_kv_heads=2, ffn_hidden_size=128,
                  vocab_size=300, num_experts=8, moe_top_k=2, moe_ffn_hidden_size=32,
                  shared_expert_ffn_hidden_size=48, moe_z_loss_coef=1e-2, aux_loss_coef=0.01)
# Four layers, the first dense: with pp=2 the first stage holds layers 0 (dense) and 1 (MoE).
MOE4 = dataclasses.replace(MOE, num_layers=4, mlp_only_layers=[0], tie_word_embeddings=False)
MBS, SEQ, MICRO = 2, 16, 2
SCALE = 1.0 / MICRO


def _microbatches(cfg: ModelConfig) -> list[torch.Tensor]:
    ids = torch.randint(0, cfg.vocab_size, (MICRO * MBS, SEQ + 1), generator=torch.Generator().manual_seed(0))
    return list(ids.split(MBS))


def _runner(cfg: ModelConfig, topo: Topology, chunks) -> PipelineRunner:
    return PipelineRunner(chunks, cfg, topo, MBS, SEQ, torch.float32, torch.device("cpu"))


def _step(recompute: str):
    model = Qwen2Model(MOE)
    model.set_recompute(recompute)
    result = _runner(MOE, Topology.single(), [model]).run(_microbatches(MOE), loss_scale=SCALE,
                                                          aux_coef=MOE.aux_loss_coef)
    return result, {n: p.grad.clone() for n, p in model.named_parameters()}


def _explicit_step():
    """The objective written out with the public forward: per micro-batch, scale * (mean token loss
    + aux_coef * aux loss + z_coef * the layers' z-losses)."""
    model = Qwen2Model(MOE)
    z_losses = []
    for mb in _microbatches(MOE):
        out = model(mb[:, :-1], labels=mb[:, 1:])
        z = sum(s.z_loss for s in out.moe_stats.values())
        z_losses.append(z.detach())
        (SCALE * (out.token_loss.mean() + MOE.aux_loss_coef * out.aux_loss + MOE.moe_z_loss_coef * z)).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}, z_losses


@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
def test_each_microbatch_counts_once_and_the_gradient_is_the_objectives(recompute):
    result, grads = _step(recompute)
    ref_grads, z_losses = _explicit_step()
    tokens = MICRO * MBS * SEQ * MOE.moe_top_k  # routed copies: micro-batches x rows x tokens x top-k
    assert sorted(result.moe_load) == [0, 1]
    for load in result.moe_load.values():
        assert load.forwards == MICRO
        assert int(load.tokens_per_expert.sum()) == tokens
        assert load.dropped == 0
    metrics = moe_load_metrics(result.moe_load, None)
    assert sorted(metrics["moe_load"]) == ["0", "1"]
    assert metrics["moe_z_loss"] == pytest.approx(sum(z_losses).item() / MICRO, rel=1e-6)
    if recompute != "none":
        plain, _ = _step("none")
        assert metrics == moe_load_metrics(plain.moe_load, None)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, msg=name)
    # The z-loss is part of that gradient: the router weights' differ without it.
    no_z = Qwen2Model(dataclasses.replace(MOE, moe_z_loss_coef=0.0))
    _runner(no_z.cfg, Topology.single(), [no_z]).run(_microbatches(MOE), loss_scale=SCALE, aux_coef=MOE.aux_loss_coef)
    assert not torch.allclose(no_z.layers["0"].mlp.router.weight.grad, grads["layers.0.mlp.router.weight"])


def test_validation_between_steps_changes_nothing():
    model = Qwen2Model(MOE)
    runner = _runner(MOE, Topology.single(), [model])
    first = runner.run(_microbatches(MOE), loss_scale=SCALE, aux_coef=MOE.aux_loss_coef)
    runner.forward_only(_microbatches(MOE), loss_scale=SCALE, aux_coef=0.0)
    second = runner.run(_microbatches(MOE), loss_scale=SCALE, aux_coef=MOE.aux_loss_coef)
    assert moe_load_metrics(second.moe_load, None) == moe_load_metrics(first.moe_load, None)


def test_the_block_keeps_nothing_between_forwards():
    """Its attributes and its dispatcher's are the same objects with the same values after a
    training forward and backward (containers compared by content)."""
    model = Qwen2Model(dataclasses.replace(MOE, moe_capacity_factor=0.5))  # drops some copies
    block = model.layers["0"].mlp

    def state():
        return [{k: copy.copy(v) if isinstance(v, (dict, list, set)) else v for k, v in vars(obj).items()}
                for obj in (block, block.dispatcher)]

    before = state()
    mb = _microbatches(MOE)[0]
    out = model(mb[:, :-1], labels=mb[:, 1:])
    assert out.moe_stats[0].dropped > 0
    (out.token_loss.mean() + out.aux_loss).backward()
    assert state() == before
    assert not list(block.buffers())


def _pp_worker(rank, world):
    topo = Topology.build(ParallelConfig(pp=2), world, rank)
    chunks = build_model_chunks(MOE4, ParallelConfig(pp=2), topo)
    result = _runner(MOE4, topo, chunks).run(_microbatches(MOE4), loss_scale=SCALE, aux_coef=MOE4.aux_loss_coef)
    grads = {n: p.grad for chunk in chunks for n, p in chunk.named_parameters()}
    return moe_load_metrics(result.moe_load, None), result.moe_load, grads


def test_every_pipeline_stage_counts_its_own_layers_and_their_z_loss():
    """pp=2 against one process: the first stage (a dense and a MoE layer, not the last) returns its
    own layer's statistics and back-propagates its z-loss: the same gradients."""
    model = Qwen2Model(MOE4)
    ref = _runner(MOE4, Topology.single(), [model]).run(_microbatches(MOE4), loss_scale=SCALE,
                                                        aux_coef=MOE4.aux_loss_coef)
    ref_metrics = moe_load_metrics(ref.moe_load, None)["moe_load"]
    ref_grads = {n: p.grad for n, p in model.named_parameters()}
    stages = run_distributed(_pp_worker, 2)
    assert [sorted(load) for _, load, _ in stages] == [[1], [2, 3]]
    for metrics, load, grads in stages:
        assert metrics["moe_load"] == {str(i): ref_metrics[str(i)] for i in load}
        for i in load:
            torch.testing.assert_close(load[i].z_loss_sum, ref.moe_load[i].z_loss_sum)
        for name, g in grads.items():
            torch.testing.assert_close(g, ref_grads[name], msg=name)
