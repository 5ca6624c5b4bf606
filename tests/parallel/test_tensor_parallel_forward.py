"""Tensor-parallel layers give the single-process model's logits, losses and gradients."""

import torch
import torch.distributed as dist

from megatron_qwen2.config import ModelConfig, ParallelConfig
from megatron_qwen2.model import Qwen2Model
from megatron_qwen2.parallel import Topology
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
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad
        dim = getattr(p, "tp_split_dim", None)
        if dim is not None and topo.tp > 1:
            parts = [torch.empty_like(g) for _ in range(topo.tp)]
            dist.all_gather(parts, g.contiguous(), group=topo.group("tp"))
            g = torch.cat(parts, dim=dim)
        grads[name] = g
    return logits.detach(), loss.detach(), grads


def _tp_worker(rank, world_size, model_kwargs, ids):
    topo = Topology.build(ParallelConfig(tp=world_size, sequence_parallel=False), world_size, rank)
    return _run(model_kwargs, topo, ids)


def _check(model_kwargs):
    ids = torch.randint(0, model_kwargs["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(0))
    ref_logits, ref_loss, ref_grads = _run(model_kwargs, Topology.single(), ids)
    for logits, loss, grads in run_distributed(_tp_worker, 2, model_kwargs, ids):
        torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
        assert grads.keys() == ref_grads.keys()
        for name in grads:
            torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_tp2_dense_matches_single_process():
    _check(DENSE)


def test_tp2_moe_tied_matches_single_process():
    _check(MOE)
