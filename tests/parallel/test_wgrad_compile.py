"""A decoder layer with the weight gradients accumulated into main_grad by the GEMM
(layers._LinearMainGrad, ops.library.wgrad_into_main_grad) compiles with torch.compile as one graph
and gives the main grads of eager mode, on the CPU.

The fused path runs on CUDA only (layers._fuse_wgrad); here the CUDA condition is lifted, so the
op's CPU branch (fp32 operands, the same sum) stands in for the CUDA GEMM.
"""

import pytest
import torch

from megatron_qwen2.config import ModelConfig
from megatron_qwen2.engine.grad_buffer import GradBuffer
from megatron_qwen2.model import Qwen2Model
from megatron_qwen2.ops import library
from megatron_qwen2.parallel import layers

CFG = ModelConfig(name="t", hidden_size=64, num_layers=1, num_attention_heads=4, num_kv_heads=2,
                  ffn_hidden_size=96, vocab_size=128, max_position_embeddings=64)


@pytest.fixture
def fused_on_cpu(monkeypatch):
    monkeypatch.setattr(layers, "_fuse_wgrad", lambda x, weight: (torch.is_grad_enabled() and weight.requires_grad
                                                                  and hasattr(weight, "main_grad")))


def _main_grads(compiled: bool, microbatches: int = 2) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The layer's main grads after `microbatches` backward passes, and the parameters whose
    gradient the GEMM added (the mark the gradient buffer's hook reads, seen just before it)."""
    torch.manual_seed(0)
    model = Qwen2Model(CFG).to(torch.bfloat16)
    marked = []
    for name, p in model.named_parameters():
        p.register_post_accumulate_grad_hook(
            lambda p, name=name: marked.append(name) if getattr(p, "wgrad_in_main_grad", False) else None)
    buf = GradBuffer(list(model.parameters()), overlap=False)
    layer = model.layers["0"]
    if compiled:
        layer.compile(fullgraph=True)  # one graph for the whole layer, or an error
    s, b = 16, 2
    cos, sin = model.rotary(torch.arange(s).expand(b, s).t(), torch.bfloat16)
    gen = torch.Generator().manual_seed(1)
    buf.start_step(microbatches)
    for _ in range(microbatches):
        x = torch.randn(s, b, CFG.hidden_size, generator=gen).to(torch.bfloat16).requires_grad_()
        out, _ = layer(x, cos, sin)
        out.float().square().mean().backward()
    buf.finish()
    return {n: p.main_grad.clone() for n, p in layer.named_parameters()}, marked


def test_compiled_layer_with_fused_weight_grads_matches_eager(fused_on_cpu):
    torch._dynamo.reset()
    eager, marked_eager = _main_grads(compiled=False)
    compiled, marked_compiled = _main_grads(compiled=True)
    # The 4 linears (qkv, out, gate_up, down), in each of the 2 micro-batches.
    linears = ["attention.qkv.weight", "attention.out.weight", "mlp.gate_up.weight", "mlp.down.weight"]
    assert sorted(marked_eager) == sorted(marked_compiled) == sorted(f"layers.0.{n}" for n in linears * 2)
    for name, g in eager.items():
        assert g.abs().sum() > 0, name
        torch.testing.assert_close(compiled[name], g, rtol=2e-2, atol=1e-4, msg=name)


def test_wgrad_op_adds_in_fp32_and_marks_the_parameter():
    weight = torch.nn.Parameter(torch.randn(3, 2, 4, dtype=torch.bfloat16))  # a stacked weight [stack, out, in]
    main = torch.ones(3, 2, 4)
    dy, x = torch.randn(5, 6, dtype=torch.bfloat16), torch.randn(5, 4, dtype=torch.bfloat16)
    library.wgrad_into_main_grad(weight, main, dy, x)
    torch.testing.assert_close(main.view(6, 4), 1 + dy.float().t() @ x.float())
    assert weight.wgrad_in_main_grad is True
    with pytest.raises(TypeError, match="the parameter itself"):
        library.wgrad_into_main_grad(weight.detach(), main, dy, x)
