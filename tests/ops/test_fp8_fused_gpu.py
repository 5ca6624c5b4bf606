"""The ops that hand an FP8 linear layer its input already quantised (megatron_qwen2::rms_norm_fp8,
megatron_qwen2::swiglu_fp8; docs/architecture.md, "FP8") against the unfused path on the GPU:
quantize_pair(pad_rows(op(x))) after the op's own kernel, every byte and scale bit for bit, for each
activation tiling and shapes with tails (rows past a token multiple, features past a 1 x 128 tile),
the rows the fused kernels take (RMSNorm's register path, SwiGLU's 8-element rows) and those that go
through the separate kernels (RMSNorm's warp and generic paths, fp32 norms, odd SwiGLU widths); the
backward through the stand-in equals the unfused op's; and a bf16 model trains bit for bit the same
with the fusion on and off."""

import pytest
import torch

from megatron_qwen2 import ops
from megatron_qwen2.config import ModelConfig
from megatron_qwen2.model.qwen2 import Qwen2Model
from megatron_qwen2.ops import extension, library
from megatron_qwen2.ops.fp8 import Fp8, Fp8Weights, quantize_input, recipe
from tests.ops.test_fp8_quant_kernels import assert_same, spread

pytestmark = pytest.mark.gpu

BF16 = torch.bfloat16
RECIPES = ["tensorwise", "rowwise", "blockwise"]
# (rows, hidden): register path with 128 threads (NP 1 .. 8) and with 256, a 1 x 128 tile cut short
# (200, 2056, 5000, 12000), rows padded to 16 / 128 (137, 77, 33); the generic path (h % 8 != 0,
# 20000 > 2048 packs) composes the separate kernels.
NORM_SHAPES = [(8192, 3584), (137, 200), (1, 2056), (77, 5000), (33, 8192), (16, 12000), (130, 1000), (5, 20000),
               (9, 300)]
# (rows, f) of SwiGLU's output; f % 8 != 0 composes the separate kernels.
SWIGLU_SHAPES = [(8192, 18944), (137, 200), (1, 8), (77, 1000), (300, 136), (5, 12), (3, 18)]


@pytest.fixture(autouse=True)
def _need_ext():
    if extension.load() is None:
        pytest.fail("the CUDA extension megatron_qwen2._C is not built on this GPU machine")


@pytest.fixture(params=["warp-rows-on", "warp-rows-off"])
def warp_rows(request, monkeypatch):
    """RMSNorm's warp-per-row path on (rows of <= 2048 bf16 take it, the fusion then composes) or off
    (every aligned row up to 2048 packs takes the register path, which the fusion runs)."""
    if request.param == "warp-rows-off":
        monkeypatch.setenv("MEGATRON_QWEN2_RMS_WARP_ROWS", "0")
    return request.param


def assert_same_input(fused, ref, what: str):
    assert fused.q.tiling == ref.q.tiling == fused.t.tiling
    assert_same(fused.q.data, ref.q.data, f"{what} data")
    assert_same(fused.q.scale_inv, ref.q.scale_inv, f"{what} scale_inv")
    assert_same(fused.t.data, ref.t.data, f"{what} data_t")
    assert_same(fused.t.scale_inv, ref.t.scale_inv, f"{what} scale_inv_t")


def norm_inputs(shape, dtype, seed=0):
    rows, h = shape
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = spread(shape, dtype, seed=seed, row_decades=2.0, col_decades=1.0)
    w = (1 + 0.5 * torch.randn(h, device="cuda", generator=g)).to(dtype)
    w[:: max(1, h // 7)] *= 30  # a few loud columns: the column amaxes differ
    return x, w


@pytest.mark.parametrize("name", RECIPES)
@pytest.mark.parametrize("shape", NORM_SHAPES)
def test_rms_norm_fp8_matches_the_unfused_path(shape, name, warp_rows):
    rcp = recipe(name)
    x, w = norm_inputs(shape, BF16)
    fused = ops.rms_norm_fp8(x, w, 1e-6, rcp)
    assert_same_input(fused, quantize_input(ops.rms_norm(x, w, 1e-6), rcp), f"rms_norm {name}")
    assert fused.stand_in.shape == x.shape and fused.stand_in.dtype == x.dtype


@pytest.mark.parametrize("name", RECIPES)
@pytest.mark.parametrize("shape", [(8192, 3584), (137, 200), (77, 5000), (16, 12000), (9, 300)])
def test_add_rms_norm_fp8_matches_the_unfused_path(shape, name, warp_rows):
    rcp = recipe(name)
    x, w = norm_inputs(shape, BF16)
    residual = spread(shape, BF16, seed=1, row_decades=1.0, col_decades=1.0)
    fused, s = ops.add_rms_norm_fp8(x, residual, w, 1e-6, rcp)
    y, s_ref = ops.add_rms_norm(x, residual, w, 1e-6)
    assert_same_input(fused, quantize_input(y, rcp), f"add_rms_norm {name}")
    assert torch.equal(s.view(torch.int16), s_ref.view(torch.int16))


@pytest.mark.parametrize("name", RECIPES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_rms_norm_fp8_other_dtypes(dtype, name):
    """fp16 takes the fused kernels, fp32 the separate ones: the same values either way."""
    rcp = recipe(name)
    x, w = norm_inputs((137, 3000), dtype)
    assert_same_input(ops.rms_norm_fp8(x, w, 1e-5, rcp), quantize_input(ops.rms_norm(x, w, 1e-5), rcp), name)


def test_rms_norm_fp8_rstd_and_zero_padding_rows():
    """rstd is the norm's, and the padded rows quantise as zeros (the tile and row scales of amax 0)."""
    x, w = norm_inputs((100, 3584), BF16)
    out = library.rms_norm_fp8(x, None, w, 1e-6, "1x128", 128)
    _, rstd = library.rms_norm(x, w, 1e-6)
    assert torch.equal(out[4], rstd)
    assert not out[0][100:].view(torch.uint8).any() and not out[2][:, 100:].view(torch.uint8).any()


@pytest.mark.parametrize("name", RECIPES)
@pytest.mark.parametrize("shape", SWIGLU_SHAPES)
def test_swiglu_fp8_matches_the_unfused_path(shape, name):
    rcp = recipe(name)
    rows, f = shape
    x = spread((rows, 2 * f), BF16, row_decades=2.0, col_decades=2.0)
    fused = ops.swiglu_fp8(x, rcp)
    assert_same_input(fused, quantize_input(ops.swiglu(x), rcp), f"swiglu {name}")
    assert fused.stand_in.shape == (rows, f)


@pytest.mark.parametrize("name", RECIPES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_swiglu_fp8_other_dtypes(dtype, name):
    rcp = recipe(name)
    x = spread((77, 2 * 1000), dtype, row_decades=1.0, col_decades=1.0)
    assert_same_input(ops.swiglu_fp8(x, rcp), quantize_input(ops.swiglu(x), rcp), name)


@pytest.mark.parametrize("residual", [False, True])
def test_backward_through_the_stand_in_is_the_unfused_ops(residual, monkeypatch):
    monkeypatch.setenv("MEGATRON_QWEN2_RMS_WARP_ROWS", "0")
    rcp = recipe("blockwise")
    x0, w0 = norm_inputs((300, 1024), BF16)
    r0 = spread((300, 1024), BF16, seed=3)
    dy = spread((300, 1024), BF16, seed=4)
    dsum = spread((300, 1024), BF16, seed=5)

    def grads(fused: bool):
        x, w, r = (t.clone().requires_grad_() for t in (x0, w0, r0))
        if residual:
            if fused:
                inp, s = ops.add_rms_norm_fp8(x, r, w, 1e-6, rcp)
                y = inp.stand_in
            else:
                y, s = ops.add_rms_norm(x, r, w, 1e-6)
            torch.autograd.backward([y, s], [dy, dsum])
            return x.grad, r.grad, w.grad
        y = ops.rms_norm_fp8(x, w, 1e-6, rcp).stand_in if fused else ops.rms_norm(x, w, 1e-6)
        y.backward(dy)
        return x.grad, w.grad

    for a, b in zip(grads(True), grads(False)):
        assert torch.equal(a, b)

    g0 = spread((300, 2 * 1024), BF16, seed=6)
    dh = spread((300, 1024), BF16, seed=7)
    outs = []
    for fused in (True, False):
        g = g0.clone().requires_grad_()
        (ops.swiglu_fp8(g, rcp).stand_in if fused else ops.swiglu(g)).backward(dh)
        outs.append(g.grad)
    assert torch.equal(*outs)


@pytest.mark.parametrize("name", RECIPES)
def test_a_bf16_model_trains_the_same_fused_and_unfused(name, monkeypatch):
    """Forward loss and every gradient bit for bit (hidden 256: the register path with warp rows off)."""
    monkeypatch.setenv("MEGATRON_QWEN2_RMS_WARP_ROWS", "0")
    cfg = ModelConfig(hidden_size=256, num_layers=2, num_attention_heads=8, num_kv_heads=4, head_dim=32,
                      ffn_hidden_size=512, vocab_size=1024)
    ids = torch.randint(0, 1024, (2, 100), generator=torch.Generator().manual_seed(0)).cuda()
    results = []
    for fused in (True, False):
        model = Qwen2Model(cfg, fp8=Fp8(recipe(name), Fp8Weights(), fused_quantization=fused)).cuda().to(BF16)
        model.init_weights(1)
        loss = model(ids, labels=ids).token_loss.float().mean()
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.equal(loss_a, loss_b)
    for n, g in grads_a.items():
        assert torch.equal(g, grads_b[n]), n
