"""The compiled kernels (RMSNorm, MoE permute/unpermute, RoPE, cross-entropy) against the fp64
reference on the GPU: forward and every gradient, many shapes (odd sizes, the scalar fallback
paths, zero-token experts, one-token inputs), determinism, custom-op registration, torch.compile."""

import pytest
import torch

from megatron_qwen2 import ops
from megatron_qwen2.ops import extension, library, reference

pytestmark = pytest.mark.gpu

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Relative Frobenius error ||out - ref|| / ||ref|| allowed per storage dtype (METHOD.md's bands).
REL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


@pytest.fixture(autouse=True)
def _need_ext():
    if extension.load() is None:
        pytest.fail("the CUDA extension megatron_qwen2._C is not built on this GPU machine")


def rel(out, ref):
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all(), "non-finite values in the kernel output"
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def check(out, ref, dtype, factor=1.0):
    assert out.shape == ref.shape
    err = rel(out, ref)
    assert err < REL[dtype] * factor, f"relative error {err:.3g} >= {REL[dtype] * factor:.3g}"


# ---- RMSNorm

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 896), (7, 1536), (33, 3584), (5, 8192), (3, 100), (2, 3, 24),
                                   (4, 16384), (257, 896)])
@pytest.mark.parametrize("fused", [False, True])
def test_rms_norm_matches_reference(dtype, shape, fused):
    h = shape[-1]
    x = torch.randn(shape, device="cuda", dtype=dtype, requires_grad=True)
    w = (1 + 0.3 * torch.randn(h, device="cuda", dtype=dtype)).requires_grad_(True)
    xr, wr = x.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
    dy = torch.randn(shape, device="cuda", dtype=dtype)
    if fused:
        res = torch.randn(shape, device="cuda", dtype=dtype, requires_grad=True)
        resr = res.detach().double().requires_grad_(True)
        y, s = ops.add_rms_norm(x, res, w, 1e-6)
        # the kernel normalises the rounded sum: so does the reference, given the same rounded sum
        yr, sr = reference.add_rms_norm(xr, resr, wr, 1e-6)
        ds = torch.randn(shape, device="cuda", dtype=dtype)
        torch.autograd.backward([y, s], [dy, ds])
        torch.autograd.backward([yr, sr], [dy.double(), ds.double()])
        check(s, sr, dtype)
        check(res.grad, resr.grad, dtype, 2)
    else:
        y = ops.rms_norm(x, w, 1e-6)
        yr = reference.rms_norm(xr, wr, 1e-6)
        y.backward(dy)
        yr.backward(dy.double())
    check(y, yr, dtype)
    check(x.grad, xr.grad, dtype, 2)
    check(w.grad, wr.grad, dtype, 2)


def test_rms_norm_unaligned_and_empty_and_deterministic():
    base = torch.randn(4 * 64 + 1, device="cuda", dtype=torch.bfloat16)
    x = base[1:].view(4, 64)  # contiguous, not 16-byte aligned: the generic path
    w = torch.randn(64, device="cuda", dtype=torch.bfloat16)
    check(ops.rms_norm(x, w, 1e-5), reference.rms_norm(x.double(), w.double(), 1e-5), torch.bfloat16)
    e = torch.empty(0, 64, device="cuda", requires_grad=True)
    we = torch.ones(64, device="cuda", requires_grad=True)
    ops.rms_norm(e, we, 1e-5).sum().backward()
    assert we.grad is not None and (we.grad == 0).all()
    x = torch.randn(4096, 3584, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(3584, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn_like(x)
    ext = extension.load()
    y, rstd = ext.rms_norm_forward(x, None, w, 1e-6)
    a = ext.rms_norm_backward(dy, x, w, rstd, None)
    b = ext.rms_norm_backward(dy, x, w, rstd, None)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("dtype,shape", [(torch.bfloat16, (4099, 1536)), (torch.bfloat16, (1000, 896)),
                                         (torch.bfloat16, (300, 2048)), (torch.float32, (513, 1024)),
                                         (torch.float16, (77, 24))])
def test_rms_norm_warp_rows_path_matches_block_path(monkeypatch, dtype, shape):
    """Short rows take the warp-per-row kernels; MEGATRON_QWEN2_RMS_WARP_ROWS=0 forces the block ones."""
    x = torch.randn(shape, device="cuda", dtype=dtype)
    res = torch.randn(shape, device="cuda", dtype=dtype)
    w = 1 + 0.3 * torch.randn(shape[-1], device="cuda", dtype=dtype)
    dy, ds = torch.randn_like(x), torch.randn_like(x)
    ext = extension.load()
    out = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("MEGATRON_QWEN2_RMS_WARP_ROWS", flag)
        y, rstd, s = ext.rms_norm_forward(x, res, w, 1e-6)
        dx, dw = ext.rms_norm_backward(dy, s, w, rstd, ds)
        dx2, dw2 = ext.rms_norm_backward(dy, s, w, rstd, ds)
        assert torch.equal(dx, dx2) and torch.equal(dw, dw2), "backward is not deterministic"
        out[flag] = (y, s, dx, dw)
    sr = (x.double() + res.double()).to(dtype).double().requires_grad_(True)
    wr = w.double().requires_grad_(True)
    yr = reference.rms_norm(sr, wr, 1e-6)
    yr.backward(dy.double())
    for y, s, dx, dw in out.values():
        assert torch.equal(s, out["0"][1])
        check(y, yr, dtype)
        check(dx, sr.grad + ds.double(), dtype, 2)
        check(dw, wr.grad, dtype, 2)


@pytest.mark.parametrize("dtype,rows,h", [
    (torch.bfloat16, 16384, 8192),  # Qwen2-72B: many rows per block of the persistent grid
    (torch.bfloat16, 2049, 8192),   # odd row count
    (torch.bfloat16, 3, 8192),      # fewer rows than SMs
    (torch.bfloat16, 1001, 5120),   # 5 of 8 packs per thread
    (torch.bfloat16, 777, 3000),    # a multiple of 8, not of 256: the last pack of some threads is past h
    (torch.bfloat16, 129, 12296),   # 256 threads, a partial last pack
    (torch.float16, 999, 8192),
    (torch.float32, 515, 8192),     # fp32: 8 packs x 256 threads
    (torch.float32, 64, 8200),      # fp32 beyond the register path: the generic kernels
])
def test_rms_norm_long_rows_match_reference(dtype, rows, h):
    """The register path for long rows (one row per block at a time, persistent grid, dw summed per
    block in shared memory, dsum copied asynchronously), fused and not, against the fp64 reference;
    the backward twice, bitwise equal."""
    x = torch.randn(rows, h, device="cuda", dtype=dtype)
    res = torch.randn_like(x)
    w = 1 + 0.3 * torch.randn(h, device="cuda", dtype=dtype)
    dy, ds = torch.randn_like(x), torch.randn_like(x)
    ext = extension.load()
    y, rstd, s = ext.rms_norm_forward(x, res, w, 1e-6)
    y1, rstd1 = ext.rms_norm_forward(s, None, w, 1e-6)
    assert torch.equal(y, y1) and torch.equal(rstd, rstd1)
    sr = (x.double() + res.double()).to(dtype).double().requires_grad_(True)
    assert torch.equal(s.double(), sr.detach())
    wr = w.double().requires_grad_(True)
    yr = reference.rms_norm(sr, wr, 1e-6)
    yr.backward(dy.double())
    check(y, yr, dtype)
    torch.testing.assert_close(rstd.double(), sr.detach().pow(2).mean(-1).add(1e-6).rsqrt(), rtol=1e-5, atol=0)
    for dsum in (ds, None):
        dx, dw = ext.rms_norm_backward(dy, s, w, rstd, dsum)
        dx2, dw2 = ext.rms_norm_backward(dy, s, w, rstd, dsum)
        assert torch.equal(dx, dx2) and torch.equal(dw, dw2), "backward is not deterministic"
        check(dx, sr.grad + (ds.double() if dsum is not None else 0), dtype, 2)
        check(dw, wr.grad, dtype, 2)


def test_rms_norm_rejects_bad_input():
    ext = extension.load()
    with pytest.raises(RuntimeError, match="weight"):
        ext.rms_norm_forward(torch.randn(4, 8, device="cuda"), None, torch.randn(7, device="cuda"), 1e-6)
    with pytest.raises(RuntimeError, match="residual"):
        ext.rms_norm_forward(torch.randn(4, 8, device="cuda"), torch.randn(4, 8, device="cuda").half(),
                             torch.randn(8, device="cuda"), 1e-6)
    with pytest.raises(ValueError, match="weight"):
        ops.rms_norm(torch.randn(4, 8, device="cuda"), torch.randn(7, device="cuda"), 1e-6)


# ---- MoE permute / unpermute

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,k,experts,h", [(1, 1, 1, 8), (5, 2, 64, 24), (300, 8, 64, 3584), (17, 4, 3, 7),
                                                (64, 8, 128, 896), (129, 6, 16, 1000)])
def test_permute_unpermute_match_reference(dtype, tokens, k, experts, h):
    x = torch.randn(tokens, h, device="cuda", dtype=dtype, requires_grad=True)
    routing = torch.stack([torch.randperm(experts, device="cuda")[:k] for _ in range(tokens)]) if k <= experts \
        else torch.randint(0, experts, (tokens, k), device="cuda")
    probs = torch.rand(tokens, k, device="cuda", dtype=dtype, requires_grad=True)
    permuted, row_map, counts = ops.permute(x, routing, experts)
    order, row_map_ref, counts_ref = reference.permute_indices(routing, experts)
    assert torch.equal(row_map, row_map_ref) and torch.equal(counts, counts_ref)
    assert counts.sum().item() == tokens * k
    assert torch.equal(permuted, x.detach()[order // k])  # a pure copy: bitwise
    w_out = torch.randn(h, h, device="cuda", dtype=torch.float64) / h ** 0.5
    expert_out = (permuted.double() @ w_out).to(dtype).detach().requires_grad_(True)  # stands for the experts
    y = ops.unpermute(expert_out, row_map, probs)
    er = expert_out.detach().double().requires_grad_(True)
    pr = probs.detach().double().requires_grad_(True)
    yr = reference.unpermute(er, row_map, pr)
    check(y, yr, dtype)
    dy = torch.randn_like(y)
    y.backward(dy)
    yr.backward(dy.double())
    check(expert_out.grad, er.grad, dtype)
    check(probs.grad, pr.grad, dtype, 2)
    assert probs.grad.dtype == dtype
    dperm = torch.randn_like(permuted)
    (dx,) = torch.autograd.grad(permuted, x, dperm)
    dx_ref = torch.zeros(tokens, h, dtype=torch.float64, device="cuda").index_add_(0, order // k, dperm.double())
    check(dx, dx_ref, dtype)


@pytest.mark.parametrize("multiple", [16, 128])
def test_padded_permute_matches_the_reference(multiple):
    """The kernels with each expert's group padded (ops.permute multiple): the same rows, rows and
    counts as the CPU reference, zero padding rows in the permuted rows and in their gradient, and
    the same unpermute and input gradient as without padding."""
    tokens, k, experts, h = 300, 8, 64, 1000
    x = torch.randn(tokens, h, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    routing = torch.stack([torch.randperm(experts, device="cuda")[:k] for _ in range(tokens)])
    probs = torch.rand(tokens, k, device="cuda", requires_grad=True)
    padded, padded_map, groups = ops.permute(x, routing, experts, multiple)
    ref, ref_map, ref_groups = ops.permute(x.detach().cpu(), routing.cpu(), experts, multiple)
    assert torch.equal(padded.cpu(), ref) and torch.equal(padded_map.cpu(), ref_map)
    assert torch.equal(groups.cpu(), ref_groups) and (groups % multiple == 0).all()
    plain, row_map, _ = ops.permute(x, routing, experts)
    y = ops.unpermute(padded, padded_map, probs)
    assert torch.equal(y, ops.unpermute(plain, row_map, probs))
    dy = torch.randn_like(y)
    dpadded, dprobs = torch.autograd.grad(y, (padded, probs), dy, retain_graph=True)
    dplain, dprobs_plain = torch.autograd.grad(ops.unpermute(plain, row_map, probs), (plain, probs), dy)
    mapped = torch.zeros(padded.shape[0], dtype=torch.bool, device="cuda")
    mapped[padded_map.reshape(-1).long()] = True
    assert not dpadded[~mapped].any() and torch.equal(dpadded[padded_map.reshape(-1).long()],
                                                     dplain[row_map.reshape(-1).long()])
    assert torch.equal(dprobs, dprobs_plain)
    dx, = torch.autograd.grad(padded, x, dpadded)
    dx_plain, = torch.autograd.grad(plain, x, dplain)
    assert torch.equal(dx, dx_plain)


def test_permute_zero_token_experts_and_determinism():
    tokens, k, experts, h = 2048, 8, 64, 3584
    routing = torch.randint(0, 8, (tokens, k), device="cuda")  # experts 8..63 get no token
    x = torch.randn(tokens, h, device="cuda", dtype=torch.bfloat16)
    probs = torch.rand(tokens, k, device="cuda")
    p1, rm1, c1 = ops.permute(x, routing, experts)
    p2, rm2, c2 = ops.permute(x, routing, experts)
    assert torch.equal(p1, p2) and torch.equal(rm1, rm2) and (c1[8:] == 0).all()
    ext = extension.load()
    flat = rm1.reshape(-1)
    dout = torch.randn(tokens, h, device="cuda", dtype=torch.bfloat16)
    runs = [ext.unpermute_backward(dout, p1, flat, probs) for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    dxs = [ext.permute_backward(p1, flat, k) for _ in range(2)]
    assert torch.equal(dxs[0], dxs[1])


@pytest.mark.parametrize("tokens,k,experts", [(16384, 8, 64), (3000, 6, 5), (1, 1, 300), (0, 2, 4)])
@pytest.mark.parametrize("id_dtype", [torch.int64, torch.int32])
def test_expert_rows_kernel_equals_stable_sort(tokens, k, experts, id_dtype):
    routing = torch.randint(0, experts, (tokens, k), device="cuda", dtype=id_dtype)
    row_map, counts = library.expert_rows(routing, experts)
    _, row_map_ref, counts_ref = reference.permute_indices(routing, experts)
    assert torch.equal(row_map, row_map_ref.reshape(-1)) and torch.equal(counts, counts_ref)


def test_permute_rejects_bad_routing():
    x = torch.randn(4, 8, device="cuda")
    with pytest.raises(ValueError, match="routing_map"):
        ops.permute(x, torch.full((4, 2), 9, device="cuda"), 8)
    with pytest.raises(ValueError, match="routing_map"):
        ops.permute(x, torch.zeros(3, 2, dtype=torch.long, device="cuda"), 8)


# ---- RoPE

def _tables(s, b, d, dtype, base=10000.0):
    pos = torch.randint(0, 4096, (s, b), device="cuda").double()  # positions given, not 0..s-1
    inv = 1.0 / base ** (torch.arange(0, d, 2, device="cuda", dtype=torch.float64) / d)
    emb = torch.cat([pos[..., None] * inv, pos[..., None] * inv], -1)[:, :, None, :]  # [s, b, 1, d]
    return (emb.cos() * 1.1).to(dtype), (emb.sin() * 1.1).to(dtype)  # a YaRN-like scale


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("s,b,heads,d", [(1, 1, 1, 64), (37, 2, 7, 128), (16, 3, 4, 6), (128, 1, 28, 128)])
def test_rope_matches_reference_on_qkv_views(dtype, s, b, heads, d):
    g = 2
    qkv = torch.randn(s, b, heads, g + 2, d, device="cuda", dtype=dtype, requires_grad=True)
    q = qkv[:, :, :, :g].reshape(s, b, heads * g, d)
    k = qkv[:, :, :, g]  # strided view, as the attention block makes it
    cos, sin = _tables(s, b, d, dtype)
    outs = [ops.rope(q, cos, sin), ops.rope(k, cos, sin)]
    qkvr = qkv.detach().double().requires_grad_(True)
    qr = qkvr[:, :, :, :g].reshape(s, b, heads * g, d)
    kr = qkvr[:, :, :, g]
    refs = [reference.rope(qr, cos.double(), sin.double()), reference.rope(kr, cos.double(), sin.double())]
    for o, r in zip(outs, refs):
        check(o, r, dtype)
    dys = [torch.randn_like(o) for o in outs]
    torch.autograd.backward(outs, dys)
    torch.autograd.backward(refs, [d_.double() for d_ in dys])
    check(qkv.grad, qkvr.grad, dtype)


def test_rope_tables_per_head():
    x = torch.randn(9, 2, 3, 64, device="cuda", requires_grad=True)
    cos, sin = torch.rand(9, 2, 3, 64, device="cuda"), torch.rand(9, 1, 3, 64, device="cuda")
    y = ops.rope(x, cos, sin)
    xr = x.detach().double().requires_grad_(True)
    yr = reference.rope(xr, cos.double(), sin.double())
    check(y, yr, torch.float32)
    dy = torch.randn_like(y)
    y.backward(dy)
    yr.backward(dy.double())
    check(x.grad, xr.grad, torch.float32)


def test_rope_three_dim_and_fallbacks():
    x = torch.randn(5, 3, 32, device="cuda", requires_grad=True)
    cos, sin = torch.rand(5, 1, 32, device="cuda"), torch.rand(5, 1, 32, device="cuda")
    torch.testing.assert_close(ops.rope(x, cos, sin), reference.rope(x, cos, sin), rtol=1e-5, atol=1e-6)
    ops.rope(x, cos, sin).sum().backward()  # an expanded (stride 0) gradient
    xr = x.detach().clone().requires_grad_(True)
    reference.rope(xr, cos, sin).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-6)
    cos64 = cos.double()  # dtype mismatch: the reference
    torch.testing.assert_close(ops.rope(x.double(), cos64, sin.double()), reference.rope(x.double(), cos64, sin.double()))


# ---- Cross-entropy

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 11), (7, 1000), (64, 32000), (3, 4, 152)])
def test_cross_entropy_matches_reference(dtype, shape):
    v = shape[-1]
    logits = (3 * torch.randn(shape, device="cuda", dtype=torch.float32)).to(dtype).requires_grad_(True)
    labels = torch.randint(0, v, shape[:-1], device="cuda")
    loss = ops.cross_entropy(logits, labels)
    lr = logits.detach().double().requires_grad_(True)
    ref = torch.nn.functional.cross_entropy(lr.flatten(0, -2), labels.flatten(), reduction="none").view(labels.shape)
    assert loss.dtype == torch.float32
    check(loss, ref, torch.float32, 10)
    g = torch.rand_like(loss)
    loss.backward(g)
    ref.backward(g.double())
    assert logits.grad.dtype == dtype
    check(logits.grad, lr.grad, dtype, 2)


def test_cross_entropy_shard_statistics_combine():
    # Two vocabulary shards combined as the tp all-reduces do: the same loss as the whole row.
    n, v = 33, 4002
    logits = 4 * torch.randn(n, v, device="cuda", dtype=torch.bfloat16)
    labels = torch.randint(0, v, (n,), device="cuda")
    parts = []
    for start in (0, v // 2):
        local = labels - start
        tgt = torch.where((local >= 0) & (local < v // 2), local, torch.full_like(local, -1))
        parts.append(library.cross_entropy_stats(logits[:, start:start + v // 2].contiguous(), tgt))
    m = torch.maximum(parts[0][0], parts[1][0])
    s = sum(p[1] * torch.exp(p[0] - m) for p in parts)
    loss = m + torch.log(s) - (parts[0][2] + parts[1][2])
    ref = torch.nn.functional.cross_entropy(logits.double(), labels, reduction="none")
    check(loss, ref, torch.float32, 10)


# ---- Registration: custom ops pass torch.library.opcheck, and torch.compile traces them

def test_custom_ops_pass_opcheck():
    x = torch.randn(6, 64, device="cuda", requires_grad=True)
    w = torch.randn(64, device="cuda", requires_grad=True)
    torch.library.opcheck(library.rms_norm, (x, w, 1e-6))
    torch.library.opcheck(library.add_rms_norm, (x, torch.randn_like(x).requires_grad_(True), w, 1e-6))
    torch.library.opcheck(library.swiglu, (torch.randn(4, 32, device="cuda", requires_grad=True),))
    _, row_map, _ = ops.permute(x.detach(), torch.randint(0, 4, (6, 2), device="cuda"), 4)
    flat = row_map.reshape(-1)
    torch.library.opcheck(library.permute, (x, flat, 2, 12))
    y = torch.randn(12, 64, device="cuda", requires_grad=True)
    torch.library.opcheck(library.unpermute, (y, flat, torch.rand(6, 2, device="cuda", requires_grad=True)))
    cos, sin = torch.rand(5, 1, 1, 16, device="cuda"), torch.rand(5, 1, 1, 16, device="cuda")
    torch.library.opcheck(library.rope, (torch.randn(5, 2, 3, 16, device="cuda", requires_grad=True), cos, sin))
    torch.library.opcheck(library.expert_rows, (torch.randint(0, 5, (7, 3), device="cuda"), 5))
    torch.library.opcheck(library.cross_entropy_stats, (torch.randn(4, 50, device="cuda"),
                                                        torch.tensor([1, -1, 49, 0], device="cuda")))


def test_torch_compile_traces_the_kernels():
    def block(x, w, res):
        h, s = ops.add_rms_norm(x, res, w, 1e-6)
        return ops.swiglu(torch.cat([h, h], -1)).sum() + ops.rms_norm(s, w, 1e-6).sum()

    x = torch.randn(16, 128, device="cuda", requires_grad=True)
    res = torch.randn(16, 128, device="cuda")
    w = torch.randn(128, device="cuda", requires_grad=True)
    compiled = torch.compile(block, fullgraph=True)
    out = compiled(x, w, res)
    out.backward()
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    ref = block(x, w, res)
    ref.backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(gx, x.grad)
    torch.testing.assert_close(gw, w.grad)


def test_reference_mode_forces_reference(monkeypatch):
    monkeypatch.setenv("MEGATRON_QWEN2_OPS", "reference")
    extension.load.cache_clear()
    try:
        assert not extension.use_kernel(torch.randn(2, device="cuda"))
    finally:
        monkeypatch.delenv("MEGATRON_QWEN2_OPS")
        extension.load.cache_clear()
    assert extension.use_kernel(torch.randn(2, device="cuda"))
