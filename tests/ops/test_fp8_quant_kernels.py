"""The compiled FP8 quantisation kernels (megatron_qwen2::fp8_quantize, fp8_quantize_tensorwise)
against the PyTorch definition of ops.fp8's quantisation on the GPU: the e4m3 bytes and scale_inv bit for
bit, for x and (transposed) for x.t(), over many shapes (tails of 8 / 16 / 128 columns, odd rows,
rows long enough for the two-read path, unaligned inputs), every e4m3 rounding tie, all-zero,
NaN, +-inf, huge and tiny values, fp32 / bf16 / fp16 inputs, empty tensors, no host sync; and the byte
transpose of FP8 codes (megatron_qwen2::fp8_transpose) against torch's."""

import pytest
import torch

from megatron_qwen2.ops import extension, fp8, library

pytestmark = pytest.mark.gpu

# The PyTorch definition (ops.fp8.quantize itself runs these kernels on CUDA).
quantize = fp8.quantize_reference

BF16 = torch.bfloat16
SHAPES = [(1, 16), (8192, 3584), (4096, 18944), (1000, 2368), (137, 300), (3, 5), (1, 1), (2, 7), (128, 128),
          (255, 257), (129, 136), (16, 1032), (40, 6000), (20, 12000), (5000, 8), (33, 40000), (7, 65600), (300, 129)]
SMALL = [(1, 16), (137, 300), (3, 5), (255, 257), (129, 136), (3, 20000), (33, 40000), (64, 1024), (2, 7)]


@pytest.fixture(autouse=True)
def _need_ext():
    if extension.load() is None:
        pytest.fail("the CUDA extension megatron_qwen2._C is not built on this GPU machine")


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a float32 / float8 tensor, flattened."""
    t = t.contiguous().reshape(-1)
    return t.view(torch.int32) if t.dtype == torch.float32 else t.view(torch.uint8)


def assert_same(out: torch.Tensor, ref: torch.Tensor, what: str):
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert out.dtype == ref.dtype, f"{what}: dtype {out.dtype} != {ref.dtype}"
    strides = [(so, sr) for n, so, sr in zip(out.shape, out.stride(), ref.stride()) if n > 1]
    assert all(so == sr for so, sr in strides), f"{what}: strides {out.stride()} != {ref.stride()}"
    diff = bits(out) != bits(ref)
    if out.dtype == torch.float32:  # a NaN scale is NaN whatever its payload
        diff &= ~(out.contiguous().reshape(-1).isnan() & ref.contiguous().reshape(-1).isnan())
    diff = diff.nonzero()
    if diff.numel():
        i = diff[0, 0].item()
        o, r = bits(out)[i].item(), bits(ref)[i].item()
        pytest.fail(f"{what}: {diff.numel()} of {out.numel()} differ; first at flat index {i}: {o:#x} vs {r:#x}")


def check(x: torch.Tensor, tiling: str, transpose: bool):
    """The kernel's outputs for x equal quantize(x) (and quantize(x.t())) bit for bit."""
    if tiling == "tensor":
        out = library.fp8_quantize_tensorwise(x, transpose)
    else:
        out = library.fp8_quantize(x, tiling, transpose)
    assert len(out) == (2 + (1 if tiling == "tensor" else 2) * transpose)
    ref = quantize(x, tiling)
    assert_same(out[0], ref.data, f"{tiling} data")
    assert_same(out[1], ref.scale_inv, f"{tiling} scale_inv")
    if transpose:
        ref_t = quantize(x.t(), tiling)
        assert_same(out[2], ref_t.data, f"{tiling} data_t")
        if tiling != "tensor":
            assert_same(out[3], ref_t.scale_inv, f"{tiling} scale_inv_t")


def spread(shape, dtype=BF16, seed=0, row_decades=6.0, col_decades=3.0):
    """Gaussian values with a different magnitude per row and per column, so every group (row,
    column, 1 x 128 tile) has its own amax."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    r, c = shape
    x = torch.randn(r, c, device="cuda", generator=g)
    x = x * 10 ** ((torch.rand(r, 1, device="cuda", generator=g) - 0.5) * row_decades)
    x = x * 10 ** ((torch.rand(1, c, device="cuda", generator=g) - 0.5) * col_decades)
    return x.to(dtype)


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("tiling", ["row", "1x128", "tensor"])
@pytest.mark.parametrize("shape", SHAPES)
def test_bf16_matches_definition(shape, tiling, transpose):
    check(spread(shape), tiling, transpose)


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("tiling", ["row", "1x128", "tensor"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SMALL + [(1024, 4096)])
def test_fp32_fp16_match_definition(shape, dtype, tiling, transpose):
    check(spread(shape, dtype, row_decades=4.0 if dtype == torch.float16 else 6.0, col_decades=2.0), tiling, transpose)


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("tiling", ["row", "1x128", "tensor"])
@pytest.mark.parametrize("dtype", [BF16, torch.float32])
@pytest.mark.parametrize("shape", [(64, 1024), (37, 296), (17, 129)])
def test_unaligned_input_matches_definition(shape, dtype, tiling, transpose):
    r, c = shape
    base = spread((1, r * c + 1), dtype).reshape(-1)
    x = base[1:].view(r, c)  # contiguous, not 16-byte aligned: the element-wise load path
    check(x, tiling, transpose)


def _every_bf16_within_448():
    """Every finite bf16 value of magnitude <= 448 (so every e4m3 rounding tie and subnormal),
    both signs, laid out so that every row, column and 1 x 128 tile also holds 448: each group's
    scale is then exactly 1 and the codes are the plain round-to-nearest-even conversion."""
    pos = torch.arange(0, 0x43E1, dtype=torch.int32).to(torch.int16).view(BF16)  # 0 .. 448
    values = torch.cat([pos, -pos]).cuda()
    c = 256
    mark = torch.zeros(1, c, dtype=torch.bool, device="cuda")
    mark[0, ::128] = True
    per_row = c - int(mark.sum())
    r = -(-values.numel() // per_row)
    r += -(-r // 127)  # room for the marker rows
    x = torch.full((r, c), 448.0, dtype=BF16, device="cuda")
    rows = torch.ones(r, dtype=torch.bool, device="cuda")
    rows[::128] = False
    free = rows[:, None] & ~mark
    fill = torch.zeros(int(free.sum()), dtype=BF16, device="cuda")
    fill[: values.numel()] = values
    x[free] = fill
    return x


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("tiling", ["row", "1x128", "tensor"])
@pytest.mark.parametrize("dtype", [BF16, torch.float32, torch.float16])
def test_rounding_of_every_tie(dtype, tiling, transpose):
    x = _every_bf16_within_448().to(dtype)
    assert quantize(x, tiling).scale_inv.eq(1).all()
    check(x, tiling, transpose)


def _special(dtype):
    """Rows of special values: zeros, a NaN, +-inf, the largest finite values (1 / amax is then a
    denormal fp32), values under the amax floor, denormals of the storage type, signed zeros."""
    big = torch.finfo(dtype).max
    tiny = torch.finfo(dtype).smallest_normal
    x = spread((24, 300), dtype, seed=3)
    x[0] = 0
    x[1, 7] = float("nan")
    x[2, 299] = float("inf")
    x[3, 130] = float("-inf")
    x[4] = (torch.linspace(-1, 1, 300, device="cuda") * big).to(dtype)
    x[5] = torch.linspace(-1e-13, 1e-13, 300, device="cuda").to(dtype)
    x[6] = (torch.randn(300, device="cuda") * tiny / 4).to(dtype)
    x[7] = -0.0
    x[8, :5] = big
    x[9] = x[9] * 1e-3
    x[9, 200] = 1e4 if dtype != torch.float16 else 6e4
    x[10, 0] = float("nan")
    x[10, 1] = float("inf")
    x[11, 150:] = 0
    x[12] = (torch.randn(300, device="cuda") * 1e-30).to(dtype) if dtype != torch.float16 else 1e-7
    return x


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("tiling", ["row", "1x128", "tensor"])
@pytest.mark.parametrize("dtype", [BF16, torch.float32, torch.float16])
def test_special_values_match_definition(dtype, tiling, transpose):
    x = _special(dtype)
    if tiling == "tensor":  # a NaN or an inf decides the whole tensor: check the others without them
        check(torch.cat([x[:1], x[4:10], x[11:]]), tiling, transpose)
    check(x, tiling, transpose)


@pytest.mark.parametrize("tiling", ["row", "1x128", "tensor"])
def test_all_zero_and_saturating_tensors(tiling):
    for x in (torch.zeros(130, 260, device="cuda", dtype=BF16),
              torch.full((130, 260), -3e38, device="cuda", dtype=BF16),
              torch.full((130, 260), float("inf"), device="cuda", dtype=BF16),
              torch.full((130, 260), float("nan"), device="cuda", dtype=BF16)):
        for transpose in (False, True):
            check(x, tiling, transpose)


@pytest.mark.parametrize("shape", [(0, 5), (5, 0), (0, 0), (0, 300)])
def test_empty_inputs_give_empty_outputs(shape):
    r, c = shape
    x = torch.empty(shape, device="cuda", dtype=BF16)
    data, sinv, data_t, sinv_t = library.fp8_quantize(x, "row", True)
    assert data.shape == (r, c) and data_t.shape == (c, r) and data.dtype == torch.float8_e4m3fn
    assert sinv.shape == (r, 1) and sinv_t.shape == (c, 1)
    floor = quantize(torch.zeros(1, 1, device="cuda"), "row").scale_inv
    assert (sinv == floor).all() and (sinv_t == floor).all()  # an empty row has the amax of zeros
    data, sinv, data_t, sinv_t = library.fp8_quantize(x, "1x128", True)
    assert data.shape == (r, c) and sinv.shape == (r, -(-c // 128)) and sinv_t.shape == (c, -(-r // 128))
    data, sinv, data_t = library.fp8_quantize_tensorwise(x, True)
    assert data.shape == (r, c) and data_t.shape == (c, r) and sinv.shape == () and sinv == floor.reshape(())


def test_non_contiguous_input_is_quantised_as_its_values():
    x = spread((300, 200))
    xt = x.t()  # [200, 300], strided
    for tiling in ("row", "1x128"):
        out = library.fp8_quantize(xt, tiling, True)
        ref = quantize(xt, tiling)
        assert_same(out[0], ref.data, "data")
        assert_same(out[2], quantize(x, tiling).data, "data_t")


def test_rejects_bad_input():
    with pytest.raises(RuntimeError, match="2-D"):
        library.fp8_quantize(torch.randn(2, 3, 4, device="cuda"), "row", False)
    with pytest.raises(RuntimeError, match="tiling"):
        library.fp8_quantize(torch.randn(2, 3, device="cuda"), "128x128", False)
    with pytest.raises(RuntimeError, match="CUDA"):
        library.fp8_quantize(torch.randn(2, 3), "row", False)
    with pytest.raises(RuntimeError):
        library.fp8_quantize_tensorwise(torch.randint(0, 3, (2, 3), device="cuda"), False)


def test_deterministic_and_no_host_sync():
    """Repeated calls give the same bytes, and every op records into a CUDA graph (a host
    synchronisation, e.g. reading the amax back, would make the capture fail)."""
    x = spread((1000, 2368))
    calls = [lambda: library.fp8_quantize_tensorwise(x, True), lambda: library.fp8_quantize(x, "row", True),
             lambda: library.fp8_quantize(x, "1x128", True), lambda: library.fp8_quantize(x, "row", False)]
    for call in calls:
        a, b = call(), call()
        for u, v in zip(a, b):
            assert torch.equal(bits(u), bits(v))
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            call()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = call()
        graph.replay()
        torch.cuda.synchronize()
        for u, v in zip(out, a):
            assert torch.equal(bits(u), bits(v))


def test_registered_and_pass_opcheck():
    assert hasattr(torch.ops.megatron_qwen2, "fp8_quantize")
    assert hasattr(torch.ops.megatron_qwen2, "fp8_quantize_tensorwise")
    x = spread((40, 300))
    for tiling in ("row", "1x128"):
        for transpose in (False, True):
            torch.library.opcheck(library.fp8_quantize, (x, tiling, transpose))
    for transpose in (False, True):
        torch.library.opcheck(library.fp8_quantize_tensorwise, (x, transpose))


@pytest.mark.parametrize("shape", [(1, 1), (2, 7), (16, 16), (128, 128), (137, 300), (300, 129), (3584, 18944),
                                   (18944, 3584), (5, 4000), (4000, 5), (3, 256, 384), (4, 100, 37)])
def test_transpose_codes_match_torch(shape):
    """fp8_transpose gives torch's transpose of every byte (all 256 patterns occur), 2D and stacked."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randint(0, 256, shape, device="cuda", dtype=torch.uint8, generator=gen).view(torch.float8_e4m3fn)
    out = library.fp8_transpose(x)
    assert out.shape == (*shape[:-2], shape[-1], shape[-2]) and out.is_contiguous()
    assert torch.equal(out.view(torch.uint8), x.view(torch.uint8).transpose(-2, -1))
    assert torch.equal(fp8.transposed_codes(x).view(torch.uint8), out.view(torch.uint8))


def test_transpose_codes_rejects_bad_input():
    with pytest.raises(RuntimeError, match="1-byte"):
        library.fp8_transpose(torch.randn(4, 4, device="cuda"))
    with pytest.raises(RuntimeError, match="contiguous"):
        library.fp8_transpose(torch.zeros(4, 4, device="cuda", dtype=torch.uint8).t())
    # opcheck's schema test does arithmetic on the inputs, which float8 lacks: its codes as uint8
    torch.library.opcheck(library.fp8_transpose, (torch.randint(0, 256, (40, 48), device="cuda", dtype=torch.uint8),))
