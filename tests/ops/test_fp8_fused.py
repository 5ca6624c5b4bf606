"""FP8 linear layers taking their input already quantised by the op that made it (`Fp8Input`;
ops.rms_norm_fp8, ops.add_rms_norm_fp8, ops.swiglu_fp8; docs/architecture.md, "FP8") on the CPU,
where those ops compose the references with the quantisation: the model trains bit for bit as with
the quantisation in the layers, the norms hand over quantised only where no all-gather stands in
between, and a sequence-parallel layer refuses a quantised input. The fused kernels themselves are
tested on the GPU (tests/ops/test_fp8_fused_gpu.py)."""

import pytest
import torch

from megatron_qwen2 import ops
from megatron_qwen2.config import ModelConfig, ParallelConfig
from megatron_qwen2.model.qwen2 import Qwen2Model
from megatron_qwen2.ops.fp8 import Fp8, Fp8Input, Fp8Weights, quantize_input, recipe
from megatron_qwen2.parallel.layers import ColumnParallelLinear
from megatron_qwen2.parallel.topology import Topology

RECIPES = ["tensorwise", "rowwise", "blockwise"]
MODEL = dict(hidden_size=128, num_layers=2, num_attention_heads=8, num_kv_heads=4, head_dim=32, ffn_hidden_size=256,
             vocab_size=512)


def _loss_and_grads(cfg: ModelConfig, name: str, fused: bool, ids: torch.Tensor):
    model = Qwen2Model(cfg, fp8=Fp8(recipe(name), Fp8Weights(), fused_quantization=fused))
    model.init_weights(1)
    loss = model(ids, labels=ids).token_loss.mean()
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", RECIPES)
def test_the_model_trains_the_same_with_quantised_inputs_handed_over(name):
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(0))  # 80 tokens: padded rows
    cfg = ModelConfig(**MODEL)
    loss, grads = _loss_and_grads(cfg, name, True, ids)
    ref_loss, ref_grads = _loss_and_grads(cfg, name, False, ids)
    assert torch.equal(loss, ref_loss)
    assert grads.keys() == ref_grads.keys()
    for n, g in grads.items():
        assert torch.equal(g, ref_grads[n]), n


def _fp8_outs(model: Qwen2Model):
    layer = model.layers["0"]
    return layer.input_norm.fp8_out, layer.post_attention_norm.fp8_out, getattr(layer.mlp, "fp8_out", None)


def test_norms_hand_over_quantised_only_without_an_all_gather_in_between():
    fp8 = Fp8(recipe("blockwise"), Fp8Weights())
    rcp = fp8.recipe
    with torch.device("meta"):
        alone = Qwen2Model(ModelConfig(**MODEL), fp8=fp8)
        tp_sp = Qwen2Model(ModelConfig(**MODEL), Topology.plan(ParallelConfig(tp=2, sequence_parallel=True), 2, 0),
                           fp8=fp8)
        tp = Qwen2Model(ModelConfig(**MODEL), Topology.plan(ParallelConfig(tp=2, sequence_parallel=False), 2, 0),
                        fp8=fp8)
        moe = Qwen2Model(ModelConfig(**MODEL, num_experts=4, moe_top_k=2, moe_ffn_hidden_size=128), fp8=fp8)
        off = Qwen2Model(ModelConfig(**MODEL), fp8=Fp8(rcp, Fp8Weights(), fused_quantization=False))
    assert _fp8_outs(alone) == (rcp, rcp, rcp)
    assert _fp8_outs(tp) == (rcp, rcp, rcp)
    assert _fp8_outs(tp_sp) == (None, None, rcp)  # SwiGLU's down projection takes it under any layout
    assert _fp8_outs(moe)[:2] == (rcp, None)  # the router reads the post-attention norm too
    assert _fp8_outs(off) == (None, None, None)


@pytest.mark.parametrize("name", RECIPES)
def test_the_ops_give_quantize_input_of_the_unfused_op(name):
    """On the CPU the doors compose the reference with the quantisation (the definition the GPU's fused
    kernels are held to); the sum of add_rms_norm_fp8 is add_rms_norm's."""
    rcp = recipe(name)
    torch.manual_seed(0)
    x, r, w = torch.randn(3, 50, 256), torch.randn(3, 50, 256), torch.rand(256) + 0.5
    for fused, ref in [(ops.rms_norm_fp8(x, w, 1e-6, rcp), quantize_input(ops.rms_norm(x, w, 1e-6), rcp)),
                       (ops.add_rms_norm_fp8(x, r, w, 1e-6, rcp)[0],
                        quantize_input(ops.add_rms_norm(x, r, w, 1e-6)[0], rcp)),
                       (ops.swiglu_fp8(x, rcp), quantize_input(ops.swiglu(x), rcp))]:
        assert fused.q.data.shape[0] == (256 if name == "blockwise" else 160)  # 150 tokens padded to the multiple
        for a, b in [(fused.q.data, ref.q.data), (fused.q.scale_inv, ref.q.scale_inv), (fused.t.data, ref.t.data),
                     (fused.t.scale_inv, ref.t.scale_inv)]:
            assert torch.equal(a.view(torch.uint8) if a.element_size() == 1 else a,
                               b.view(torch.uint8) if b.element_size() == 1 else b)
    assert torch.equal(ops.add_rms_norm_fp8(x, r, w, 1e-6, rcp)[1], x + r)


def test_a_sequence_parallel_layer_refuses_a_quantised_input():
    layer = ColumnParallelLinear(128, 128, bias=False, sequence_parallel=True, fp8=Fp8(recipe("rowwise"), Fp8Weights()))
    x = quantize_input(torch.randn(16, 1, 128), recipe("rowwise"))
    assert isinstance(x, Fp8Input)
    with pytest.raises(ValueError, match="all-gathers its input"):
        layer(x)


def _saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd keeps for backward while fn() runs."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


@pytest.mark.parametrize("name", RECIPES)
def test_the_down_projection_keeps_the_swiglu_input_not_its_quantised_output(name):
    """With the SwiGLU output handed over quantised, the down projection remakes its x^T operand in
    backward from the SwiGLU input that SwiGLU keeps anyway: the MLP holds x^T's bytes less between
    the passes than with the quantisation in the layer, and its gradients are the same bit for bit."""
    from megatron_qwen2.model.mlp import MLP

    rcp = recipe(name)
    torch.manual_seed(0)
    x = torch.randn(40, 2, 128)
    held, grads = {}, {}
    for fused in (True, False):
        mlp = MLP(128, 256, fp8=Fp8(rcp, Fp8Weights(), fused_quantization=fused))
        torch.manual_seed(1)
        torch.nn.init.normal_(mlp.gate_up.weight, std=0.05)
        torch.nn.init.normal_(mlp.down.weight, std=0.05)
        xi = x.clone().requires_grad_(True)
        out = []
        held[fused] = _saved_bytes(lambda: out.append(mlp(xi)))
        out[0].square().sum().backward()
        grads[fused] = [xi.grad, mlp.gate_up.weight.grad, mlp.down.weight.grad]
    h = torch.randn(80, 512)  # the SwiGLU input of 80 tokens
    xt = quantize_input(ops.swiglu(h), rcp).t
    assert held[False] - held[True] == xt.data.nbytes + xt.scale_inv.nbytes
    for a, b in zip(grads[True], grads[False]):
        assert torch.equal(a, b)
