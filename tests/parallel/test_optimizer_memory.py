"""Optimizer memory per rank: fp32 masters + Adam moments = 12 bytes per bf16 parameter, / dp
with the distributed optimizer (up to the padding of each bucket to a multiple of dp)."""

import pytest
import torch

from megatron_qwen2.config import ModelConfig, OptimConfig, ParallelConfig
from megatron_qwen2.engine.distributed_optimizer import MixedPrecisionOptimizer
from megatron_qwen2.engine.grad_buffer import GradBuffer
from megatron_qwen2.engine.reductions import GradientReductions
from megatron_qwen2.model import Qwen2Model
from megatron_qwen2.parallel import Topology
from tests.distributed import run_distributed

MODEL = ModelConfig(hidden_size=64, num_layers=2, num_attention_heads=4, num_kv_heads=2, ffn_hidden_size=128,
                    vocab_size=1024)


def optimizer_state_bytes(opt: MixedPrecisionOptimizer) -> int:
    """Bytes this rank holds for fp32 masters (beyond the params) and Adam moments."""
    masters = sum(f.master.numel() * 4 for f in opt.fragments if f.param.dtype != torch.float32)
    moments = sum(t.numel() * t.element_size() for state in opt.optimizer.state.values()
                  for t in state.values() if torch.is_tensor(t) and t.ndim > 0)
    return masters + moments


def _measure(rank, world_size, distributed):
    topo = Topology.build(ParallelConfig(distributed_optimizer=distributed), world_size, rank)
    model = Qwen2Model(MODEL, topo)
    model.init_weights(0)
    model.to(torch.bfloat16)
    params = list(model.parameters())
    grads = GradBuffer(params, GradientReductions.of(topo), bucket_size=20_000, shard=distributed)
    opt = MixedPrecisionOptimizer(grads, OptimConfig(warmup_steps=0))
    grads.start_step(1)
    ids = torch.randint(0, MODEL.vocab_size, (1, 9))
    model(ids[:, :-1]).float().square().mean().backward()
    grads.finish()
    opt.step(1e-3)
    return optimizer_state_bytes(opt), sum(p.numel() for p in params)


@pytest.mark.parametrize("dp", [1, 2, 4])
def test_optimizer_state_is_12_bytes_per_param_over_dp(dp):
    results = run_distributed(_measure, dp, True) if dp > 1 else [_measure(0, 1, False)]
    nparams = results[0][1]
    for state_bytes, _ in results:
        # Each bucket pads to a multiple of dp: at most dp - 1 extra elements per bucket.
        assert 12 * nparams / dp <= state_bytes <= 12 * (nparams / dp + 64 * dp), (dp, state_bytes, nparams)
    print(f"dp={dp}: {nparams} params, optimizer state {results[0][0]} bytes/rank = "
          f"{results[0][0] / nparams:.3f} bytes/param")
