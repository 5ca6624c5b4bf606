"""FP8 quantisation, the emulated FP8 GEMMs and the FP8 linear layers (megatron_qwen2/ops/fp8.py) on the CPU."""

import pytest
import torch

from megatron_qwen2.ops.fp8 import (BLOCK, E4M3, E5M2, FP8_MAX, Fp8, Fp8Weights, gemm, quantize, recipe)
from megatron_qwen2.parallel.layers import linear
from megatron_qwen2.model.moe import grouped_linear

TILINGS = ["tensor", "row", "1x128", "128x128"]
RECIPES = ["tensorwise", "rowwise", "blockwise"]
# e4m3 keeps 3 mantissa bits: a value in the normal range rounds to within 2^-4 of itself.
E4M3_REL = 2.0 ** -4


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def tile_amax(x, tiling):
    """The amax each element of x [R, C] was scaled by, as an [R, C] tensor."""
    r, c = x.shape
    a = x.abs().float()
    if tiling == "tensor":
        return a.amax().expand(r, c)
    if tiling == "row":
        return a.amax(1, keepdim=True).expand(r, c)
    if tiling == "1x128":
        return torch.cat([a[:, j:j + BLOCK].amax(1, keepdim=True).expand(r, min(BLOCK, c - j))
                          for j in range(0, c, BLOCK)], dim=1)
    rows = [torch.cat([a[i:i + BLOCK, j:j + BLOCK].amax().expand(min(BLOCK, r - i), min(BLOCK, c - j))
                       for j in range(0, c, BLOCK)], dim=1) for i in range(0, r, BLOCK)]
    return torch.cat(rows, dim=0)


@pytest.mark.parametrize("tiling", TILINGS)
@pytest.mark.parametrize("shape", [(1, 16), (7, 300), (256, 384), (130, 129)])
def test_quantize_scales_each_tile_into_range(tiling, shape):
    torch.manual_seed(0)
    x = torch.randn(shape) * torch.logspace(-3, 3, shape[1])  # columns of very different size
    q = quantize(x, tiling)
    assert q.data.dtype == E4M3 and q.data.shape == x.shape and q.data.is_contiguous()
    amax = tile_amax(x, tiling)
    # The largest element of each tile lands on +-448: the whole FP8 range is used.
    scaled = q.data.float()
    assert torch.equal(scaled.abs()[x.abs() == amax], torch.full_like(scaled[x.abs() == amax], FP8_MAX[E4M3]))
    # Every value comes back within e4m3's rounding unless it is below the tile's smallest normal.
    # Subnormal (scaled below 2^-6) values are rounded to a step of 2^-9 of the scaled range.
    back, unit = q.dequantize(), amax / FP8_MAX[E4M3]
    normal = x.abs() >= unit * 2.0 ** -6
    slack = 1 + 1e-6
    assert ((back - x).abs() <= E4M3_REL * x.abs() * slack)[normal].all()
    assert ((back - x).abs() <= unit * 2.0 ** -10 * slack)[~normal].all()


def test_scale_layouts_are_those_scaled_mm_takes():
    x = torch.randn(300, 520)
    assert quantize(x, "tensor").scale_inv.shape == ()
    assert quantize(x, "row").scale_inv.shape == (300, 1)
    s = quantize(x, "1x128").scale_inv
    assert s.shape == (300, 5) and s.stride() == (1, 300)  # column-major
    s = quantize(x, "128x128").scale_inv
    assert s.shape == (3, 5) and s.is_contiguous()


def test_zero_tiles_stay_zero_and_finite():
    x = torch.zeros(4, 256)
    x[0, :128] = 1.0
    for tiling in TILINGS:
        q = quantize(x, tiling)
        assert torch.isfinite(q.scale_inv).all()
        assert torch.equal(q.dequantize(), x)


def test_e5m2_saturates_at_its_own_maximum():
    q = quantize(torch.tensor([[1.0, -3.0, 0.5, 2.0] * 4]), "row", E5M2)
    assert q.data.dtype == E5M2 and q.data.float().abs().max().item() == FP8_MAX[E5M2]


@pytest.mark.parametrize("tiling", ["tensor", "128x128"])
def test_transpose_is_the_quantisation_of_the_transpose(tiling):
    x = torch.randn(200, 300)
    t, ref = quantize(x, tiling).t(), quantize(x.t(), tiling)
    assert torch.equal(t.data.view(torch.uint8), ref.data.view(torch.uint8))
    assert torch.equal(t.scale_inv, ref.scale_inv)


def test_rowwise_and_1x128_do_not_transpose():
    for tiling in ("row", "1x128"):
        with pytest.raises(ValueError, match="quantise the transposed source"):
            quantize(torch.randn(16, 16), tiling).t()


@pytest.mark.parametrize("name", RECIPES)
def test_emulated_gemm_is_the_product_of_the_dequantised_operands(name):
    r = recipe(name)
    a, b = torch.randn(64, 256), torch.randn(48, 256)
    aq, bq = quantize(a, r.activation_tiling), quantize(b, r.weight_tiling)
    out = gemm(aq, bq, torch.float32)
    torch.testing.assert_close(out, aq.dequantize() @ bq.dequantize().t())
    assert rel(out, a @ b.t()) < 0.06


def test_recipes_and_their_names():
    assert recipe("none") is None
    assert recipe("blockwise").activation_tiling == "1x128" and recipe("blockwise").weight_tiling == "128x128"
    with pytest.raises(ValueError, match="train.fp8='fp4'"):
        recipe("fp4")


def _reference_grads(x, w, b, dy):
    x, w = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    b = None if b is None else b.detach().double().requires_grad_()
    y = torch.nn.functional.linear(x, w, b)
    y.backward(dy.double())
    return y, x.grad, w.grad, None if b is None else b.grad


@pytest.mark.parametrize("name", RECIPES)
@pytest.mark.parametrize("rows", [256, 200])  # 200: padded to the recipe's multiple for the weight gradient
@pytest.mark.parametrize("bias", [False, True])
def test_fp8_linear_forward_and_gradients(name, rows, bias):
    torch.manual_seed(1)
    x = torch.randn(rows // 8, 8, 256, requires_grad=True)
    w = (torch.randn(384, 256) * 0.05).requires_grad_()
    b = torch.randn(384, requires_grad=True) if bias else None
    dy = torch.randn(rows // 8, 8, 384)
    fp8 = Fp8(recipe(name), Fp8Weights())
    y = linear(x, w, b, fp8)
    y.backward(dy)
    ry, rx, rw, rb = _reference_grads(x, w, b, dy)
    assert y.shape == ry.shape
    # Each GEMM multiplies two operands rounded to within 2^-4: a few per cent off the exact product.
    assert rel(y, ry) < 0.05
    assert rel(x.grad, rx) < 0.06
    assert rel(w.grad, rw) < 0.06
    if bias:
        torch.testing.assert_close(b.grad.double(), rb, rtol=1e-4, atol=1e-5)  # fp32 sum of dy, unquantised


def test_fp8_weight_gradient_goes_into_main_grad():
    torch.manual_seed(2)
    x, w = torch.randn(128, 256), (torch.randn(128, 256) * 0.05).requires_grad_()
    w.main_grad = torch.ones(128, 256)
    linear(x, w, fp8=Fp8(recipe("rowwise"), Fp8Weights())).sum().backward()
    assert w.wgrad_in_main_grad
    _, _, rw, _ = _reference_grads(x, w, None, torch.ones(128, 128))
    assert rel(w.main_grad - 1.0, rw) < 0.06


def test_weights_are_quantised_once_until_cleared():
    w = torch.randn(128, 256)
    weights, r = Fp8Weights(), recipe("rowwise")
    first = weights.get(w, r)
    assert weights.get(w, r) is first
    w.mul_(2.0)
    assert weights.get(w, r) is first  # the copy of this step, until the step ends
    weights.clear()
    again = weights.get(w, r)
    assert again is not first
    torch.testing.assert_close(again.w.dequantize(), first.w.dequantize() * 2.0)
    assert weights.nbytes() == w.numel() + 128 * 4  # W, one fp32 scale per row (W^T is made when asked)


def test_a_rowwise_weight_makes_its_transpose_when_asked_and_keeps_none():
    """A rowwise dense W^T is W^T quantised along its own rows, made from the weight when the backward
    asks and not kept; routed experts keep theirs."""
    w = torch.randn(256, 384)
    weights, r = Fp8Weights(), recipe("rowwise")
    copy = weights.get(w, r)
    assert copy.cached_t is None and weights.nbytes() == w.numel() + 256 * 4
    expected = quantize(w.t().contiguous(), "row")
    assert torch.equal(copy.t().data.view(torch.uint8), expected.data.view(torch.uint8))
    assert torch.equal(copy.t().scale_inv, expected.scale_inv)
    experts = weights.get(torch.randn(2, 256, 384), r, experts=True)
    assert experts.cached_t is not None and experts.cached_t.data.shape == (2, 384, 256)


@pytest.mark.parametrize("name", ["tensorwise", "blockwise"])
def test_transposable_weights_keep_one_copy(name):
    """One scale or square blocks: a dense W^T is W's copy transposed, made when asked, not kept;
    routed experts keep theirs."""
    w = torch.randn(256, 384)
    weights, r = Fp8Weights(), recipe(name)
    copy = weights.get(w, r)
    assert copy.cached_t is None and weights.nbytes() == w.numel() + copy.w.scale_inv.nbytes
    assert torch.equal(copy.t().dequantize(), quantize(w.t().contiguous(), r.weight_tiling).dequantize())
    experts = weights.get(torch.randn(2, 256, 384), r, experts=True)
    assert experts.cached_t is not None and experts.cached_t.data.shape == (2, 384, 256)


def test_weight_gradient_slices_cover_the_whole_product(monkeypatch):
    import megatron_qwen2.ops.fp8 as fp8

    monkeypatch.setattr(fp8, "WGRAD_SLICE_ELEMENTS", 48 * 256)  # slices of 48 rows of 256
    for tiling in ("tensor", "row", "1x128"):
        dyt, xt = quantize(torch.randn(200, 512), tiling), quantize(torch.randn(256, 512), tiling)
        slices = list(fp8.weight_gemm_slices(dyt, xt))
        assert [r for r, _ in slices] == [0, 48, 96, 144, 192]
        torch.testing.assert_close(torch.cat([dw for _, dw in slices]), gemm(dyt, xt, torch.float32))


@pytest.mark.parametrize("name", RECIPES)
def test_fp8_experts_match_their_bf16_reference(name):
    torch.manual_seed(3)
    counts = [100, 0, 28, 256]
    x = torch.randn(sum(counts), 256, requires_grad=True)
    w = (torch.randn(4, 128, 256) * 0.05).requires_grad_()
    dy = torch.randn(sum(counts), 128)
    y = grouped_linear(x, w, counts, Fp8(recipe(name), Fp8Weights()))
    y.backward(dy)
    xr, wr = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    yr = torch.cat([c @ wr[e].t() for e, c in enumerate(torch.split(xr, counts))])
    yr.backward(dy.double())
    assert rel(y, yr) < 0.05 and rel(x.grad, xr.grad) < 0.06
    for e in (0, 2, 3):
        assert rel(w.grad[e], wr.grad[e]) < 0.06
    assert torch.equal(w.grad[1], torch.zeros_like(w.grad[1]))  # no rows, no gradient


@pytest.mark.parametrize("tiling", ["tensor", "row", "1x128"])
def test_experts_weight_gradients_are_added_into_main_grad(tiling):
    """Where the experts' weight gradients come one GEMM at a time, each expert's product is added
    into its slice of main_grad (what was there kept), an expert without rows gets nothing, and
    autograd is handed a placeholder; without main_grad the gradient is the products themselves."""
    from megatron_qwen2.model.moe import _expert_weight_grad
    from megatron_qwen2.ops.fp8 import grouped_weight_gemm

    counts = [128, 0, 256]
    dyt, xt = quantize(torch.randn(32, 384), tiling), quantize(torch.randn(48, 384), tiling)
    expected = torch.zeros(3, 32, 48)
    for e, s, c in ((0, 0, 128), (2, 128, 256)):
        expected[e] = gemm(dyt.cols(s, s + c), xt.cols(s, s + c), torch.float32)

    w = torch.zeros(3, 32, 48)
    w.main_grad = torch.ones(3, 32, 48)
    placeholder = _expert_weight_grad(w, grouped_weight_gemm(dyt, xt, counts))
    assert placeholder.shape == w.shape and w.wgrad_in_main_grad
    torch.testing.assert_close(w.main_grad, expected + 1)
    torch.testing.assert_close(_expert_weight_grad(torch.zeros(3, 32, 48), grouped_weight_gemm(dyt, xt, counts)),
                               expected)


@pytest.mark.parametrize("tiling", ["1x128", "128x128"])
def test_blockwise_operands_are_padded_to_whole_groups_of_k_blocks(tiling):
    from megatron_qwen2.ops.fp8 import K_BLOCK_GROUP, _whole_k_groups

    q = quantize(torch.randn(300, 520), tiling)
    padded = _whole_k_groups(q)
    assert padded.data.shape == (300, 2 * K_BLOCK_GROUP)
    assert padded.scale_inv.stride() == ((1, 300) if tiling == "1x128" else (8, 1))  # the layouts scaled_mm takes
    back = padded.dequantize()
    assert torch.equal(back[:, :520], q.dequantize()) and torch.equal(back[:, 520:], torch.zeros(300, 504))


@pytest.mark.parametrize("name", RECIPES)
def test_expert_mlp_pads_once_and_matches_padding_around_each_linear(name):
    """The experts' MLP pads the groups once for both FP8 grouped linears; its output and every
    gradient are bit for bit those of padding around each linear (zero rows stay zero)."""
    from megatron_qwen2 import ops
    from megatron_qwen2.model.moe import expert_mlp

    torch.manual_seed(6)
    counts = [37, 0, 130, 5]
    x = torch.randn(sum(counts), 128)
    gate_up, down = torch.randn(4, 2 * 64, 128) * 0.05, torch.randn(4, 128, 64) * 0.05
    dy = torch.randn(sum(counts), 128)
    runs = []
    for once in (True, False):
        fp8 = Fp8(recipe(name), Fp8Weights())
        xg, gu, dn = (t.clone().requires_grad_() for t in (x, gate_up, down))
        y = (expert_mlp(xg, gu, dn, counts, fp8) if once
             else grouped_linear(ops.swiglu(grouped_linear(xg, gu, counts, fp8)), dn, counts, fp8))
        y.backward(dy)
        runs.append((y, xg.grad, gu.grad, dn.grad))
    for once, each in zip(*runs):
        assert torch.equal(once, each)
    assert runs[0][0].abs().sum() > 0


@pytest.mark.parametrize("name", RECIPES)
def test_experts_padded_by_the_permutation_equal_padding_in_the_experts(name):
    """The dispatcher's permutation pads each expert's rows for the FP8 grouped GEMMs; the block's
    output and every gradient are bit for bit those of padding inside the experts' MLP."""
    from megatron_qwen2.model.moe import expert_mlp
    from megatron_qwen2.parallel.expert_dispatch import TokenDispatcher

    torch.manual_seed(7)
    tokens, k, experts, h, f = 40, 2, 4, 128, 64
    x, probs, dy = torch.randn(tokens, h), torch.rand(tokens, k), torch.randn(tokens, h)
    ids = torch.stack([torch.randperm(experts)[:k] for _ in range(tokens)])
    gate_up, down = torch.randn(experts, 2 * f, h) * 0.05, torch.randn(experts, h, f) * 0.05
    runs = []
    for multiple in (recipe(name).token_multiple, 1):
        xg, gu, dn = (t.clone().requires_grad_() for t in (x, gate_up, down))
        dispatcher = TokenDispatcher(experts, None)
        rows, counts, state = dispatcher.dispatch(xg, probs, ids, None, multiple)
        assert all(c % multiple == 0 for c in counts)
        y = dispatcher.combine(expert_mlp(rows, gu, dn, counts, Fp8(recipe(name), Fp8Weights())), state)
        y.backward(dy)
        runs.append((y, xg.grad, gu.grad, dn.grad))
    for padded_there, padded_here in zip(*runs):
        assert torch.equal(padded_there, padded_here)


@pytest.mark.parametrize("name", RECIPES)
def test_expert_mlp_with_no_rows(name):
    """An expert-parallel rank routed no token runs its experts' MLP in FP8: no rows out, zero weight
    gradients."""
    from megatron_qwen2.model.moe import expert_mlp

    x = torch.randn(0, 128, requires_grad=True)
    gate_up = torch.randn(4, 2 * 64, 128, requires_grad=True)
    down = torch.randn(4, 128, 64, requires_grad=True)
    y = expert_mlp(x, gate_up, down, [0, 0, 0, 0], Fp8(recipe(name), Fp8Weights()))
    y.sum().backward()
    assert y.shape == (0, 128) and x.grad.shape == (0, 128)
    assert not gate_up.grad.any() and not down.grad.any()


@pytest.mark.parametrize("name", RECIPES)
def test_experts_quantise_each_operand_once_for_all_experts(name):
    """The experts' rows are quantised as one tensor (tensorwise and rowwise scales over all of
    them), each expert's rows padded to the recipe's token multiple; the products are those of the
    dequantised operands, expert by expert."""
    from megatron_qwen2.model.moe import _pad_groups, _rows_kept

    torch.manual_seed(5)
    rcp, counts = recipe(name), [100, 0, 28, 200]
    x = torch.randn(sum(counts), 256)
    x[:100] *= 1000.0  # expert 0's rows set a tensorwise scale that expert 2's rows share
    w = torch.randn(4, 128, 256) * 0.05
    dy = torch.randn(sum(counts), 128)
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = grouped_linear(xg, wg, counts, Fp8(rcp, Fp8Weights()))
    y.backward(dy)
    m = rcp.token_multiple
    padded = [-(-c // m) * m for c in counts]
    keep = _rows_kept(counts, padded, x.device)
    xq = quantize(_pad_groups(x, keep, sum(padded)), rcp.activation_tiling).dequantize()
    dyq = quantize(_pad_groups(dy, keep, sum(padded)), rcp.activation_tiling).dequantize()
    xt = quantize(_pad_groups(x, keep, sum(padded)).t(), rcp.activation_tiling).dequantize()
    dyt = quantize(_pad_groups(dy, keep, sum(padded)).t(), rcp.activation_tiling).dequantize()
    start, ys, dxs = 0, [], []
    for e, c in enumerate(counts):
        we = quantize(w[e], rcp.weight_tiling).dequantize()
        wte = quantize(w[e].t().contiguous(), rcp.weight_tiling).dequantize()
        ys.append((xq[start:start + c] @ we.t()))
        dxs.append(dyq[start:start + c] @ wte.t())
        if c:
            torch.testing.assert_close(wg.grad[e], dyt[:, start:start + padded[e]] @ xt[:, start:start + padded[e]].t())
        start += padded[e]
    torch.testing.assert_close(y, torch.cat(ys))
    torch.testing.assert_close(xg.grad, torch.cat(dxs))
