"""The optimizer on the GPU (fused AdamW, multi-tensor grad norm, in-place clipping) against the
same optimizer on the CPU (foreach AdamW) given identical gradients, and its state round trip."""

import pytest
import torch

from megatron_qwen2.config import ModelConfig, OptimConfig
from megatron_qwen2.engine.distributed_optimizer import MixedPrecisionOptimizer
from megatron_qwen2.engine.grad_buffer import GradBuffer
from megatron_qwen2.model import Qwen2Model

pytestmark = pytest.mark.gpu

MODEL = ModelConfig(hidden_size=64, num_layers=2, num_attention_heads=4, num_kv_heads=2, ffn_hidden_size=128,
                    vocab_size=1000)


def _make(device):
    model = Qwen2Model(MODEL).to(device=device, dtype=torch.bfloat16)
    buf = GradBuffer(list(model.parameters()), overlap=False)
    opt = MixedPrecisionOptimizer(buf, OptimConfig(warmup_steps=0, clip_grad=1.0))
    return model, buf, opt


def _steps(device, n, grads_seed=0, model_opt=None):
    model, buf, opt = model_opt or _make(device)
    gen = torch.Generator().manual_seed(grads_seed)
    norms = []
    for _ in range(n):
        buf.start_step(1)
        buf.grad_data.copy_(torch.randn(buf.grad_data.shape, generator=gen) * 0.1)  # clipping is active
        norms.append(opt.step(1e-2))
    return model, buf, opt, norms


def test_fused_gpu_step_matches_cpu_step():
    assert _make("cuda")[2].optimizer.defaults.get("fused")
    gm, _, _, gnorms = _steps("cuda", 3)
    cm, _, _, cnorms = _steps("cpu", 3)
    assert gnorms == pytest.approx(cnorms, rel=1e-5)
    for (name, g), c in zip(gm.named_parameters(), cm.parameters()):
        err = ((g.detach().cpu().double() - c.detach().double()).norm() / c.detach().double().norm()).item()
        assert err < 1e-3, f"{name}: {err:.3g}"


def test_fused_state_round_trip_continues_identically():
    model, buf, opt, _ = _steps("cuda", 2)
    state = {"step": opt.state_dict()["step"],
             "fragments": [{k: v.clone() for k, v in f.items()} for f in opt.state_dict()["fragments"]]}
    other = _make("cuda")
    other[2].load_state_dict(state)
    _steps("cuda", 1, grads_seed=5, model_opt=(model, buf, opt))
    _steps("cuda", 1, grads_seed=5, model_opt=other)
    for a, b in zip(model.parameters(), other[0].parameters()):
        assert torch.equal(a, b)
