"""The model on the GPU with the compiled kernels (SwiGLU, RMSNorm and add+RMSNorm, RoPE, fused
cross-entropy) against the same model with MEGATRON_QWEN2_OPS=reference: loss and every gradient."""

import pytest
import torch

from megatron_qwen2.config import ModelConfig
from megatron_qwen2.model import Qwen2Model
from megatron_qwen2.ops import extension

pytestmark = pytest.mark.gpu


def _loss_and_grads(cfg, ids, labels, dtype, monkeypatch, mode):
    monkeypatch.setenv("MEGATRON_QWEN2_OPS", mode)
    torch.manual_seed(0)
    model = Qwen2Model(cfg).to(device="cuda", dtype=dtype)
    out = model(ids, labels=labels)
    loss = out.token_loss.mean() + (out.aux_loss if out.aux_loss is not None else 0.0)
    loss.backward()
    return out.token_loss.detach().double(), {n: p.grad.double() for n, p in model.named_parameters()}


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_kernel_model_matches_reference_model(monkeypatch, tied, dtype, tol):
    if extension.load() is None:
        pytest.fail("the CUDA extension megatron_qwen2._C is not built on this GPU machine")
    cfg = ModelConfig(name="t", hidden_size=256, num_layers=3, num_attention_heads=8, num_kv_heads=2,
                      ffn_hidden_size=704, vocab_size=5003, max_position_embeddings=512, tie_word_embeddings=tied)
    ids = torch.randint(0, cfg.vocab_size, (2, 129), device="cuda")
    labels = torch.randint(0, cfg.vocab_size, (2, 129), device="cuda")
    loss_k, grads_k = _loss_and_grads(cfg, ids, labels, dtype, monkeypatch, "kernel")
    loss_r, grads_r = _loss_and_grads(cfg, ids, labels, dtype, monkeypatch, "reference")
    assert ((loss_k - loss_r).norm() / loss_r.norm()).item() < tol / 10
    for name, g in grads_r.items():
        err = ((grads_k[name] - g).norm() / g.norm().clamp_min(1e-30)).item()
        assert err < tol, f"{name}: relative gradient error {err:.3g}"
