"""Logits (and MoE aux loss) parity with Hugging Face transformers on odd tiny configs."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402

from megatron_qwen2.checkpoint.hf import hf_config_to_model_config, hf_to_native  # noqa: E402
from megatron_qwen2.model import Qwen2Model  # noqa: E402

DENSE = dict(vocab_size=97, hidden_size=96, num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=3,
             intermediate_size=72, rope_theta=10000.0, rms_norm_eps=1e-6, max_position_embeddings=256)
MOE = dict(DENSE, num_experts=8, num_experts_per_tok=3, moe_intermediate_size=24,
           shared_expert_intermediate_size=40, decoder_sparse_step=2, mlp_only_layers=[], num_hidden_layers=4)


def _hf_and_native(tmp_path, hf_cls, cfg_cls, kwargs, seed=0):
    torch.manual_seed(seed)
    hf = hf_cls(cfg_cls(**kwargs)).eval()
    with torch.no_grad():  # HF zero-initialises some tensors (router, biases): make every one matter
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    hf.save_pretrained(tmp_path)
    cfg = hf_config_to_model_config(json.loads((tmp_path / "config.json").read_text()))
    model = Qwen2Model(cfg).eval()
    model.load_state_dict(hf_to_native(load_file(tmp_path / "model.safetensors"), cfg))
    return hf, model


@pytest.mark.parametrize("tied", [False, True])
def test_dense_logits_match(tmp_path, tied):
    hf, model = _hf_and_native(tmp_path, transformers.Qwen2ForCausalLM, transformers.Qwen2Config,
                               dict(DENSE, tie_word_embeddings=tied))
    ids = torch.randint(0, DENSE["vocab_size"], (2, 37))
    with torch.no_grad():
        ref = hf(ids).logits
        ours = model(ids)
    assert ours.shape == ref.shape == (2, 37, DENSE["vocab_size"])
    assert (ours - ref).abs().max().item() <= 1e-5


def test_dense_position_ids_and_yarn(tmp_path):
    rope = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 10000.0}
    hf, model = _hf_and_native(tmp_path, transformers.Qwen2ForCausalLM, transformers.Qwen2Config,
                               dict(DENSE, rope_parameters=rope))
    assert model.cfg.rope_scaling_type == "yarn"
    ids = torch.randint(0, DENSE["vocab_size"], (2, 20))
    pos = torch.tensor([list(range(100, 120)), list(range(7, 27))])
    with torch.no_grad():
        ref = hf(ids, position_ids=pos).logits
        ours = model(ids, position_ids=pos)
    assert (ours - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("tied,norm_topk", [(False, False), (True, True)])
def test_moe_logits_and_aux_loss_match(tmp_path, tied, norm_topk):
    kwargs = dict(MOE, tie_word_embeddings=tied, norm_topk_prob=norm_topk, mlp_only_layers=[3])
    hf, model = _hf_and_native(tmp_path, transformers.Qwen2MoeForCausalLM, transformers.Qwen2MoeConfig, kwargs)
    # layers 1 is sparse (step 2), 3 is sparse by step but listed as mlp-only.
    assert [layer.is_moe for layer in model.layers.values()] == [False, True, False, False]
    ids = torch.randint(0, MOE["vocab_size"], (3, 29))
    with torch.no_grad():
        ref = hf(ids, output_router_logits=True)
        ours = model(ids)
        loss = model(ids, labels=ids)
    assert (ours - ref.logits).abs().max().item() <= 1e-5
    assert abs(loss.aux_loss.item() - ref.aux_loss.item()) <= 1e-6


def test_moe_loss_matches_hf_training_loss(tmp_path):
    hf, model = _hf_and_native(tmp_path, transformers.Qwen2MoeForCausalLM, transformers.Qwen2MoeConfig,
                               dict(MOE, decoder_sparse_step=1))
    ids = torch.randint(0, MOE["vocab_size"], (2, 16))
    ref = hf(ids, labels=ids, output_router_logits=True)
    # HF shifts labels inside; ours takes them aligned with the inputs (the last position is dropped).
    out = model(ids, labels=ids.roll(-1, dims=1))
    total = out.token_loss[:, :-1].mean() + model.cfg.aux_loss_coef * out.aux_loss
    assert abs(total.item() - ref.loss.item()) <= 1e-5
    total.backward()
    ref.loss.backward()
    assert model.layers["0"].mlp.router.weight.grad.abs().sum() > 0
    torch.testing.assert_close(model.layers["0"].mlp.router.weight.grad, hf.model.layers[0].mlp.gate.weight.grad,
                               rtol=1e-4, atol=1e-6)
