"""The FP8 recipes on the GPU (torch._scaled_mm): each GEMM of a linear layer against the exact
product within stated bounds, the CPU emulation against the GPU path (the same quantised values,
the same products up to accumulation order), and a training step."""

import pytest
import torch

from megatron_qwen2.engine.grad_buffer import GradBuffer
from megatron_qwen2.model.moe import expert_mlp, grouped_linear
from megatron_qwen2.ops.fp8 import Fp8, Fp8Weights, gemm, quantize, recipe
from megatron_qwen2.parallel.layers import linear

pytestmark = pytest.mark.gpu

RECIPES = ["tensorwise", "rowwise", "blockwise"]
# Operands rounded to e4m3 (within 2^-4 each) give products a few per cent off the exact one on
# Gaussian data (bench/fp8_formats.py measures 1-3 % on a training run's tensors).
FORWARD_REL, GRAD_REL = 0.05, 0.06


@pytest.fixture(autouse=True)
def _need_hopper():
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0):
        pytest.fail("these tests need a GPU of compute capability 9.0+ (FP8 GEMMs)")


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("name", RECIPES)
@pytest.mark.parametrize("tokens,k,n", [(4096, 3584, 4608), (8192, 3584, 2560), (1000, 896, 1152), (136, 256, 384),
                                         (256, 128, 256), (512, 2368, 3696)])
def test_linear_gemms_against_the_exact_product(name, tokens, k, n):
    torch.manual_seed(0)
    x = torch.randn(tokens, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02).requires_grad_()
    dy = torch.randn(tokens, n, device="cuda", dtype=torch.bfloat16)
    y = linear(x, w, fp8=Fp8(recipe(name), Fp8Weights()))
    y.backward(dy)
    xd, wd = x.detach().double(), w.detach().double()
    assert y.dtype == torch.bfloat16
    assert rel(y, xd @ wd.t()) < FORWARD_REL
    assert rel(x.grad, dy.double() @ wd) < GRAD_REL
    assert rel(w.grad, dy.double().t() @ xd) < GRAD_REL


@pytest.mark.parametrize("tiling", ["tensor", "row", "1x128", "128x128"])
def test_the_emulation_quantises_like_the_gpu(tiling):
    x = torch.randn(1000, 2304, dtype=torch.bfloat16) * 5
    cpu, gpu = quantize(x, tiling), quantize(x.cuda(), tiling)
    assert torch.equal(cpu.data.view(torch.uint8), gpu.data.cpu().view(torch.uint8))
    assert torch.equal(cpu.scale_inv, gpu.scale_inv.cpu())


@pytest.mark.parametrize("name", RECIPES)
def test_the_emulated_product_is_the_gpu_product(name):
    r = recipe(name)
    a, b = torch.randn(512, 1024, dtype=torch.bfloat16), torch.randn(768, 1024, dtype=torch.bfloat16)
    cpu = gemm(quantize(a, r.activation_tiling), quantize(b, r.weight_tiling), torch.float32)
    gpu = gemm(quantize(a.cuda(), r.activation_tiling), quantize(b.cuda(), r.weight_tiling), torch.float32)
    # Hopper's FP8 tensor cores accumulate with fewer bits than fp32 (DeepSeek-V3 reports about
    # 14): the products differ from the fp32 emulation by ~1e-4.
    assert rel(gpu.cpu(), cpu) < 5e-4


@pytest.mark.parametrize("a_tiling,b_tiling", [("tensor", "tensor"), ("row", "row"), ("1x128", "1x128"),
                                               ("1x128", "128x128")])
@pytest.mark.parametrize("m,n,k", [(4608, 3584, 8192), (1152, 896, 1152), (384, 256, 640)])
def test_the_accumulating_gemm_adds_the_product(monkeypatch, a_tiling, b_tiling, m, n, k):
    """out += a @ b^T in one GEMM (csrc/fp8_gemm.cpp) is what was in out plus torch._scaled_mm's fp32
    product, for out 16-byte aligned but not 256 (the heuristic is told); an out that is not
    16-byte aligned takes the product-then-add path, with the same result."""
    import megatron_qwen2.ops.fp8 as fp8

    torch.manual_seed(0)
    a = quantize(torch.randn(m, k, device="cuda", dtype=torch.bfloat16), a_tiling)
    b = quantize(torch.randn(n, k, device="cuda", dtype=torch.bfloat16), b_tiling)
    product = gemm(a, b, torch.float32)
    for offset, expect_gemm in ((4, True), (1, False)):
        buffer = torch.randn(offset + m * n + 64, device="cuda")
        out, before = buffer[offset:offset + m * n].view(m, n), buffer.clone()
        expected = out + product
        with monkeypatch.context() as patch:
            if expect_gemm:  # the slices are the other path: this one must not take them
                patch.setattr(fp8, "weight_gemm_slices", lambda *args: pytest.fail("took the product-then-add path"))
            fp8.add_weight_gemm(a, b, out)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
        untouched = torch.ones_like(buffer, dtype=torch.bool)
        untouched[offset:offset + m * n] = False
        assert torch.equal(buffer[untouched], before[untouched])  # nothing written beside out


def test_the_accumulating_gemm_refuses_what_it_cannot_take():
    from megatron_qwen2.ops import library

    a, b = quantize(torch.randn(64, 128, device="cuda"), "tensor"), quantize(torch.randn(32, 128, device="cuda"), "tensor")
    args = (a.data, a.scale_inv, "tensor", b.data, b.scale_inv, "tensor")
    with pytest.raises(RuntimeError, match="out must be float32"):
        library.fp8_gemm_accumulate(*args, torch.zeros(64, 32, device="cuda", dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="does not fit"):
        library.fp8_gemm_accumulate(a.data, a.scale_inv, "row", *args[3:], torch.zeros(64, 32, device="cuda"))
    with pytest.raises(RuntimeError, match="share K"):
        library.fp8_gemm_accumulate(*args[:3], a.data[:32, :112], b.scale_inv, "tensor", torch.zeros(64, 32, device="cuda"))


@pytest.mark.parametrize("name", RECIPES)
def test_the_weight_gradient_into_main_grad_is_the_weight_gradient(name):
    """With main_grad (the gradient buffer's), a layer's FP8 weight gradient is added into it by the
    GEMM: what was there plus the gradient the layer hands autograd without main_grad."""
    torch.manual_seed(2)
    x = torch.randn(1000, 896, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(1000, 1152, device="cuda", dtype=torch.bfloat16)
    w = (torch.randn(1152, 896, device="cuda", dtype=torch.bfloat16) * 0.02).requires_grad_()
    linear(x, w, fp8=Fp8(recipe(name), Fp8Weights())).backward(dy)
    plain = w.grad.float()
    w.grad = None
    w.main_grad = torch.ones(1152, 896, device="cuda")
    linear(x, w, fp8=Fp8(recipe(name), Fp8Weights())).backward(dy)
    assert w.wgrad_in_main_grad
    # The plain gradient is rounded to bf16 (2^-8 relative); main_grad keeps fp32.
    torch.testing.assert_close(w.main_grad - 1, plain, rtol=1e-2, atol=1e-2 * plain.abs().max().item())


@pytest.mark.parametrize("name", RECIPES)
def test_fp8_experts_on_the_gpu(name):
    torch.manual_seed(1)
    counts = [1000, 0, 24, 2048]
    x = torch.randn(sum(counts), 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(4, 512, 1024, device="cuda", dtype=torch.bfloat16) * 0.02).requires_grad_()
    dy = torch.randn(sum(counts), 512, device="cuda", dtype=torch.bfloat16)
    y = grouped_linear(x, w, counts, Fp8(recipe(name), Fp8Weights()))
    y.backward(dy)
    xd, wd = x.detach().double(), w.detach().double()
    ref = torch.cat([c @ wd[e].t() for e, c in enumerate(torch.split(xd, counts))])
    assert rel(y, ref) < FORWARD_REL
    for e, (c, g) in enumerate(zip(torch.split(xd, counts), torch.split(dy.double(), counts))):
        if counts[e]:
            assert rel(w.grad[e], g.t() @ c) < GRAD_REL


@pytest.mark.parametrize("name", RECIPES)
def test_fp8_expert_mlp_on_the_gpu(name):
    """The experts' MLP in FP8 (groups padded once, SwiGLU's output handed to the down projection
    quantised) against the exact one, within twice a product's bounds (two FP8 products in series);
    with no rows at all (an expert-parallel rank routed no token) it runs and its weight gradients
    are zero."""
    torch.manual_seed(3)
    f = 384
    for counts in ([700, 0, 24, 1500], [0, 0, 0, 0]):
        x = torch.randn(sum(counts), 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        gu = (torch.randn(4, 2 * f, 1024, device="cuda", dtype=torch.bfloat16) * 0.02).requires_grad_()
        dn = (torch.randn(4, 1024, f, device="cuda", dtype=torch.bfloat16) * 0.02).requires_grad_()
        dy = torch.randn(sum(counts), 1024, device="cuda", dtype=torch.bfloat16)
        y = expert_mlp(x, gu, dn, counts, Fp8(recipe(name), Fp8Weights()))
        y.backward(dy)
        if not sum(counts):
            assert y.shape == (0, 1024) and not gu.grad.any() and not dn.grad.any()
            continue
        xd, gud, dnd = (t.detach().double().requires_grad_() for t in (x, gu, dn))
        outs = []
        for e, c in enumerate(torch.split(xd, counts)):
            h = c @ gud[e].t()
            outs.append((torch.nn.functional.silu(h[:, :f]) * h[:, f:]) @ dnd[e].t())
        ref = torch.cat(outs)
        ref.backward(dy.double())
        assert rel(y, ref) < 2 * FORWARD_REL and rel(x.grad, xd.grad) < 2 * GRAD_REL
        for e, c in enumerate(counts):
            if c:
                assert rel(gu.grad[e], gud.grad[e]) < 2 * GRAD_REL and rel(dn.grad[e], dnd.grad[e]) < 2 * GRAD_REL


@pytest.mark.parametrize("name", RECIPES)
def test_a_training_step_in_fp8_matches_bf16(name):
    from megatron_qwen2.config import Config, ModelConfig, OptimConfig, TrainConfig
    from megatron_qwen2.data.batch import Batch
    from megatron_qwen2.engine.step import TrainingStep
    from megatron_qwen2.parallel import Topology

    def first_losses(fp8):
        cfg = Config(model=ModelConfig(hidden_size=512, num_layers=2, num_attention_heads=4, num_kv_heads=2,
                                       ffn_hidden_size=1536, vocab_size=4096, tie_word_embeddings=False),
                     optim=OptimConfig(lr=1e-3, warmup_steps=0, schedule="constant"),
                     train=TrainConfig(micro_batch_size=2, global_batch_size=4, seq_length=512, dtype="bf16",
                                       fp8=fp8), device="cuda").validate(1)
        step = TrainingStep(cfg, Topology.build(cfg.parallel, 1, 0), torch.device("cuda"))
        gen = torch.Generator().manual_seed(0)
        return [step(Batch(tokens=torch.randint(0, 4096, (4, 513), generator=gen)), 1e-3).loss for _ in range(3)]

    ref, got = first_losses("none"), first_losses(name)
    for a, b in zip(got, ref):
        assert a == pytest.approx(b, rel=0.01)


@pytest.mark.parametrize("name", ["tensorwise", "rowwise"])
def test_grouped_expert_gemms_match_one_gemm_per_expert(name):
    """One torch._scaled_grouped_mm for all experts gives each expert's products of the GEMM loop:
    forward and input gradient alike (bf16 outputs of the same fp32 sums), weight gradients within
    bf16 rounding (the grouped GEMM writes bf16, the loop fp32)."""
    torch.manual_seed(2)
    counts = [1000, 0, 24, 2048, 333]
    x = torch.randn(sum(counts), 1024, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(5, 512, 1024, device="cuda", dtype=torch.bfloat16) * 0.02
    dy = torch.randn(sum(counts), 512, device="cuda", dtype=torch.bfloat16)
    runs = []
    for grouped in (True, False):
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = grouped_linear(xi, wi, counts, Fp8(recipe(name), Fp8Weights(), grouped_gemms=grouped))
        y.backward(dy)
        runs.append((y, xi.grad, wi.grad))
    (y, dx, dw), (y_loop, dx_loop, dw_loop) = runs
    assert rel(y, y_loop) < 1e-3 and rel(dx, dx_loop) < 1e-3
    for e, c in enumerate(counts):
        assert rel(dw[e], dw_loop[e]) < 4e-3 if c else torch.equal(dw[e], torch.zeros_like(dw[e]))


@pytest.mark.parametrize("name", RECIPES)
def test_fp8_expert_backward_holds_no_more_than_bf16s(name):
    """With the gradient buffer's main_grad (the weight gradient added into it, autograd handed a
    placeholder that the hook drops), the FP8 experts' backward peaks within a tenth of the weight's
    bf16 bytes of the bf16 experts' backward: no second weight-sized tensor beside the gradient."""
    torch.manual_seed(4)
    # Few rows, so that the weight-sized tensors dominate: the FP8 backward's own activation-sized
    # tensors (each group padded to 128 rows for blockwise, dy's FP8 copies) stay under the bound.
    counts = [128, 0, 64, 64, 32, 96, 128, 0]
    w0 = torch.randn(len(counts), 4096, 4096, device="cuda", dtype=torch.bfloat16) * 0.02
    x0 = torch.randn(sum(counts), 4096, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(sum(counts), 4096, device="cuda", dtype=torch.bfloat16)

    def backward_peak(fp8):
        w = torch.nn.Parameter(w0.clone())
        grads = GradBuffer([w], overlap=False)  # main_grad and the hook that drops autograd's gradient
        y = grouped_linear(x0.clone().requires_grad_(), w, counts, fp8)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        y.backward(dy)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before, w.main_grad

    def steady_backward_peak(fp8):
        # The second backward's: the first also allocates what outlives it once per process (the
        # backward thread's cuBLASLt workspace, at its first GEMM there), not once per step.
        backward_peak(fp8)
        return backward_peak(fp8)

    bf16_peak, bf16_grad = steady_backward_peak(None)
    fp8_peak, fp8_grad = steady_backward_peak(Fp8(recipe(name), Fp8Weights()))
    assert fp8_peak <= bf16_peak + 0.1 * w0.numel() * 2, (fp8_peak, bf16_peak)
    assert rel(fp8_grad, bf16_grad.double()) < GRAD_REL
