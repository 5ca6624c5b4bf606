"""Weight gradients accumulated into fp32 main_grad inside the GEMM (layers._LinearMainGrad) equal
the unfused path (bf16 dW, then main_grad += dW) over several micro-batches, on the GPU, with and
without activation recomputation (whose recomputed saved tensors are detached aliases of the
parameters)."""

import pytest
import torch

from megatron_qwen2.config import ModelConfig
from megatron_qwen2.engine.grad_buffer import GradBuffer
from megatron_qwen2.model import Qwen2Model
from megatron_qwen2.parallel import layers

pytestmark = pytest.mark.gpu


def _main_grads(monkeypatch, fused: bool, tied: bool, recompute: str = "none") -> tuple[dict, int]:
    monkeypatch.setenv("MEGATRON_QWEN2_WGRAD_FUSION", "1" if fused else "0")
    calls = []
    original = layers._LinearMainGrad.backward
    monkeypatch.setattr(layers._LinearMainGrad, "backward",
                        staticmethod(lambda ctx, dy: calls.append(1) or original(ctx, dy)))
    cfg = ModelConfig(name="t", hidden_size=256, num_layers=2, num_attention_heads=8, num_kv_heads=2,
                      ffn_hidden_size=704, vocab_size=3001, max_position_embeddings=512, tie_word_embeddings=tied)
    model = Qwen2Model(cfg).to(device="cuda", dtype=torch.bfloat16)
    model.set_recompute(recompute)
    buf = GradBuffer(list(model.parameters()), overlap=False)
    gen = torch.Generator(device="cuda").manual_seed(1)
    buf.start_step(3)
    for _ in range(3):
        ids = torch.randint(0, cfg.vocab_size, (2, 96), device="cuda", generator=gen)
        model(ids, labels=ids.roll(-1, 1)).token_loss.mean().backward()
    buf.finish()
    return {n: p.main_grad.double().clone() for n, p in model.named_parameters()}, len(calls)


@pytest.mark.parametrize("tied,recompute", [(False, "none"), (True, "none"), (True, "selective"), (False, "full")])
def test_fused_weight_grad_accumulation_matches_unfused(monkeypatch, tied, recompute):
    fused, n_fused = _main_grads(monkeypatch, True, tied, recompute)
    plain, n_plain = _main_grads(monkeypatch, False, tied)
    # 4 linears per layer (qkv, out, gate_up, down) x 2 layers (+ the untied head), x 3 micro-batches
    assert n_fused == 3 * (8 + (0 if tied else 1)) and n_plain == 0
    for name, g in plain.items():
        err = ((fused[name] - g).norm() / g.norm().clamp_min(1e-30)).item()
        assert err < 1e-2, f"{name}: relative error {err:.3g}"
