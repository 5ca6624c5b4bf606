"""Tensor (+ sequence) parallel layers give the single-process model's logits, losses and gradients."""

import pytest
import torch

from megatron_qwen2.config import ModelConfig, ParallelConfig
from megatron_qwen2.engine.tp_grads import sync_tp_grads
from megatron_qwen2.model import Qwen2Model
from megatron_qwen2.parallel import Topology
from megatron_qwen2.parallel.layers import gather_full
from megatron_qwen2.parallel.shard import shard_of
from tests.distributed import run_distributed

DENSE = dict(hidden_size=48, num_layers=2, num_attention_heads=4, num_kv_heads=2, ffn_hidden_size=64,
             vocab_size=96, tie_word_embeddings=False)
MOE = dict(DENSE, num_experts=4, moe_top_k=2, moe_ffn_hidden_size=16, shared_expert_ffn_hidden_size=32,
           tie_word_embeddings=True)


def _run(model_kwargs, topo, ids):
    cfg = ModelConfig(**model_kwargs)
    model = Qwen2Model(cfg, topo)
    model.init_weights(seed=7)
    logits = model(ids)
    out = model(ids, labels=ids.roll(-1, 1))
    loss = out.token_loss.mean() + (0 if out.aux_loss is None else 0.01 * out.aux_loss)
    loss.backward()
    sync_tp_grads(model.parameters(), topo.groups.tp.pg)
    grads = {}
    for name, p in model.named_parameters():
        if shard_of(p).is_expert:  # each tp rank routed its share of the tokens: summed over expert-dp
            if topo.groups.expert_dp.pg is not None:
                torch.distributed.all_reduce(p.grad, group=topo.groups.expert_dp.pg)
            grads[name] = p.grad
        else:
            grads[name] = gather_full(p, p.grad, topo.groups.tp.pg)
    return logits.detach(), loss.detach(), grads


def _tp_worker(rank, world_size, model_kwargs, ids, sp):
    topo = Topology.build(ParallelConfig(tp=world_size, sequence_parallel=sp), world_size, rank)
    return _run(model_kwargs, topo, ids)


def _check(model_kwargs, sp, seq=12, world_size=2):
    ids = torch.randint(0, model_kwargs["vocab_size"], (2, seq), generator=torch.Generator().manual_seed(0))
    ref_logits, ref_loss, ref_grads = _run(model_kwargs, Topology.single(), ids)
    for logits, loss, grads in run_distributed(_tp_worker, world_size, model_kwargs, ids, sp):
        torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
        assert grads.keys() == ref_grads.keys()
        for name in grads:
            torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("sp", [False, True], ids=["tp", "tp+sp"])
def test_tp2_dense_matches_single_process(sp):
    _check(DENSE, sp)


@pytest.mark.parametrize("sp", [False, True], ids=["tp", "tp+sp"])
def test_tp2_moe_tied_matches_single_process(sp):
    _check(MOE, sp)


def test_tp_without_sp_takes_odd_sequence_lengths():
    _check(DENSE, sp=False, seq=11)



def test_tp4_replicates_kv_heads_when_tp_exceeds_them():
    # 8 query / 2 kv heads at tp 4: each kv head lives on two ranks (as Qwen2-1.5B at tp 4).
    model = dict(DENSE, num_attention_heads=8, num_kv_heads=2, head_dim=8, ffn_hidden_size=32, vocab_size=64)
    _check(model, sp=True, world_size=4, seq=8)
