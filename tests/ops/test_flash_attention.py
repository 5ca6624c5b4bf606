"""The flash-attention kernel (csrc/flash_attn.cu) against the fp32 reference: forward output, lse
and dq / dk / dv over head dims 64 / 128, query / kv head ratios 1, 2, 7, 8, odd lengths, packed
documents (one-token documents, several per row), strided views of a [s, b, ...] buffer; the lse
gradient; the custom-op registration; the door's backend choice. CPU tests cover the document
bounds and the functional reference pair."""

import importlib
import os

import pytest
import torch

from megatron_qwen2 import ops
from megatron_qwen2.ops import extension, reference

attn = importlib.import_module("megatron_qwen2.ops.attention")  # the module (ops.attention is the door function)

BF16 = torch.bfloat16


def rel(out, ref):
    """||out - ref|| / ||ref||, the denominator floored at 1e-3 * sqrt(numel) (an rms of 0.001): a
    gradient that is zero analytically (dq of a one-token sequence) is compared absolutely."""
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all(), "non-finite values in the kernel output"
    return ((out - ref).norm() / ref.norm().clamp_min(1e-3 * ref.numel() ** 0.5)).item()


def random_documents(b, s, kind, gen):
    """document_ids [b, s], non-decreasing per row."""
    if kind == "none":
        return None
    rows = []
    for _ in range(b):
        if kind == "ones":  # every token its own document, then one long one
            lengths = [1] * min(s, 5) + [max(0, s - 5)]
        else:
            lengths, left = [], s
            while left > 0:
                n = int(torch.randint(1, max(2, s // 3), (1,), generator=gen))
                if torch.rand(1, generator=gen).item() < 0.2:
                    n = 1
                lengths.append(min(n, left))
                left -= lengths[-1]
        rows.append(torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)))
        rows[-1] = rows[-1][:s]
    return torch.stack(rows) + 3


# ---- CPU: document bounds and the functional reference pair

def test_document_bounds_match_brute_force():
    gen = torch.Generator().manual_seed(0)
    for s in (1, 2, 7, 64):
        ids = random_documents(3, s, "mixed", gen)
        start, end = attn.document_bounds(ids)
        assert start.dtype == torch.int32 and end.dtype == torch.int32
        for bi in range(3):
            for i in range(s):
                same = (ids[bi] == ids[bi, i]).nonzero().flatten()
                assert start[bi, i] == same.min() and end[bi, i] == same.max() + 1


def test_document_bounds_rejects_bad_shape():
    with pytest.raises(ValueError, match="batch, seq"):
        attn.document_bounds(torch.zeros(5, dtype=torch.long))


@pytest.mark.parametrize("docs", ["none", "mixed"])
def test_functional_reference_pair_matches_autograd(docs):
    """The CPU path of flash_attention_forward / _backward is the reference and its autograd."""
    gen = torch.Generator().manual_seed(1)
    b, s, hq, hkv, d = 2, 11, 4, 2, 16
    q = torch.randn(b, s, hq, d, generator=gen, dtype=torch.float64)
    k = torch.randn(b, s, hkv, d, generator=gen, dtype=torch.float64)
    v = torch.randn(b, s, hkv, d, generator=gen, dtype=torch.float64)
    ids = random_documents(b, s, docs, gen)
    ranges = attn.document_ranges(ids) if ids is not None else None
    out, lse = ops.flash_attention_forward(q, k, v, True, 0.3, ranges)
    ref = reference.attention(q, k, v, True, 0.3, ids)
    assert rel(out, ref) < 1e-6
    dout, dlse = torch.randn_like(out), torch.randn_like(lse)
    dq, dk, dv = ops.flash_attention_backward(dout, q, k, v, out, lse, True, 0.3, ranges, dlse=dlse)
    qq, kk, vv = (t.clone().requires_grad_(True) for t in (q, k, v))
    o, l = reference.attention_with_lse(qq, kk, vv, True, 0.3, ids)
    torch.autograd.backward((o, l), (dout, dlse))
    for got, want in ((dq, qq.grad), (dk, kk.grad), (dv, vv.grad)):
        assert rel(got, want) < 1e-5


def _two_block_attention(q, k, v, ids, cut, scale):
    """Non-causal attention over two K/V blocks [0, cut) and [cut, s) merged by lse, then each
    block's gradients from the merged out and lse (what ring attention does), summed."""
    blocks = [slice(0, cut), slice(cut, k.shape[1])]
    parts = []
    for blk in blocks:
        ranges = attn.document_ranges(ids, ids[:, blk])
        parts.append((ranges, *ops.flash_attention_forward(q, k[:, blk], v[:, blk], False, scale, ranges)))
    lse = torch.logaddexp(parts[0][2], parts[1][2])
    out = sum(o.float() * torch.exp(l - lse).transpose(1, 2).unsqueeze(-1) for _, o, l in parts)
    return blocks, parts, out.to(q.dtype), lse


def test_document_ranges_and_block_merge_match_full_attention():
    """document_ranges of a query block against a key block give the mask of equal document ids,
    and per-block backward from the merged out / lse sums to the full gradients."""
    gen = torch.Generator().manual_seed(4)
    b, s, hq, hkv, d, cut = 2, 23, 4, 2, 8, 9
    ids = random_documents(b, s, "mixed", gen)
    r = attn.document_ranges(ids[:, 5:], ids[:, :cut])
    j = torch.arange(cut)
    dense = ids[:, 5:, None] == ids[:, None, :cut]
    assert torch.equal((j >= r.key_lo[..., None]) & (j < r.key_hi[..., None]), dense)
    i = torch.arange(s - 5)
    assert torch.equal((i >= r.query_lo[..., None]) & (i < r.query_hi[..., None]), dense.transpose(1, 2))
    q = torch.randn(b, s, hq, d, generator=gen, dtype=torch.float64)
    k = torch.randn(b, s, hkv, d, generator=gen, dtype=torch.float64)
    v = torch.randn(b, s, hkv, d, generator=gen, dtype=torch.float64)
    blocks, parts, out, lse = _two_block_attention(q, k, v, ids, cut, 0.4)
    assert rel(out, reference.attention(q, k, v, False, 0.4, ids)) < 1e-6
    dout = torch.randn_like(out)
    grads = [ops.flash_attention_backward(dout, q, k[:, blk], v[:, blk], out, lse, False, 0.4, ranges)
             for blk, (ranges, _, _) in zip(blocks, parts)]
    qq, kk, vv = (t.clone().requires_grad_(True) for t in (q, k, v))
    reference.attention(qq, kk, vv, False, 0.4, ids).backward(dout)
    assert rel(grads[0][0] + grads[1][0], qq.grad) < 1e-5
    assert rel(torch.cat([grads[0][1], grads[1][1]], 1), kk.grad) < 1e-5
    assert rel(torch.cat([grads[0][2], grads[1][2]], 1), vv.grad) < 1e-5


def test_door_on_cpu_is_the_reference():
    q = torch.randn(1, 3, 2, 8)
    assert attn.backend(q, q[:, :, :1], q[:, :, :1]) == "reference"
    assert "CPU" in attn.backend_reason(q, q[:, :, :1], q[:, :, :1])


# ---- GPU: the kernel

def _need_ext():
    if extension.load() is None:
        pytest.fail("the CUDA extension megatron_qwen2._C is not built on this GPU machine")


def make_inputs(b, s, hq, hkv, d, layout, gen):
    """q [b, s, hq, d], k, v [b, s, hkv, d] bf16 on CUDA; 'model': transposed views of one
    [s, b, hkv, g + 2, d] buffer (the model's qkv projection), 'contiguous': plain tensors."""
    g = hq // hkv
    if layout == "model":
        qkv = torch.randn(s, b, hkv, g + 2, d, generator=gen).to("cuda", BF16)
        q = qkv[:, :, :, :g].reshape(s, b, hq, d).transpose(0, 1)  # reshape copies: a [s, b] buffer
        k, v = qkv[:, :, :, g].transpose(0, 1), qkv[:, :, :, g + 1].transpose(0, 1)
    else:
        q = torch.randn(b, s, hq, d, generator=gen).to("cuda", BF16)
        k = torch.randn(b, s, hkv, d, generator=gen).to("cuda", BF16)
        v = torch.randn(b, s, hkv, d, generator=gen).to("cuda", BF16)
    return q, k, v


CASES = [
    # b, s, hq, hkv, d, documents, layout
    (1, 1, 1, 1, 64, "none", "contiguous"),
    (2, 77, 2, 1, 64, "none", "model"),
    (1, 128, 8, 8, 128, "none", "contiguous"),
    (2, 257, 7, 1, 128, "none", "model"),
    (1, 300, 28, 4, 128, "none", "model"),
    (1, 513, 8, 1, 64, "mixed", "model"),
    (2, 200, 7, 7, 128, "mixed", "contiguous"),
    (3, 190, 4, 2, 128, "ones", "model"),
    (1, 1000, 14, 2, 64, "mixed", "model"),
    (2, 640, 16, 2, 128, "mixed", "contiguous"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("causal", [True, False])
def test_flash_attention_matches_reference(case, causal):
    _need_ext()
    from megatron_qwen2.ops import library

    b, s, hq, hkv, d, docs, layout = case
    gen = torch.Generator().manual_seed(2 * sum(x for x in case if isinstance(x, int)) + causal)
    q, k, v = make_inputs(b, s, hq, hkv, d, layout, gen)
    ids = random_documents(b, s, docs, gen)
    ids = ids.cuda() if ids is not None else None
    ranges = attn.document_ranges(ids) if ids is not None else (None,) * 4
    scale = d ** -0.5 * 1.3
    qg, kg, vg = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out, lse = library.flash_attention(qg, kg, vg, causal, scale, *ranges)
    assert out.shape == q.shape and lse.shape == (b, hq, s) and lse.dtype == torch.float32
    dout = torch.randn(out.shape, generator=gen).to("cuda", BF16)
    out.backward(dout)

    qr, kr, vr = (t.detach().float().requires_grad_(True) for t in (q, k, v))
    ref, ref_lse = reference.attention_with_lse(qr, kr, vr, causal, scale, ids)
    ref.backward(dout.float())
    assert rel(out, ref) < 1e-2
    assert (lse - ref_lse).abs().max().item() < 2e-2  # lse is O(log s): an absolute bound
    assert rel(qg.grad, qr.grad) < 2e-2
    assert rel(kg.grad, kr.grad) < 2e-2
    assert rel(vg.grad, vr.grad) < 2e-2
    assert kg.grad.shape == k.shape and vg.grad.shape == v.shape


@pytest.mark.gpu
@pytest.mark.parametrize("docs", ["none", "mixed"])
def test_lse_gradient_and_functional_pair(docs):
    """d(out, lse): the lse gradient enters through delta; the functional pair runs the kernel."""
    _need_ext()
    gen = torch.Generator().manual_seed(7)
    b, s, hq, hkv, d = 2, 333, 8, 2, 128
    q, k, v = make_inputs(b, s, hq, hkv, d, "model", gen)
    ids = random_documents(b, s, docs, gen)
    ids = ids.cuda() if ids is not None else None
    ranges = attn.document_ranges(ids) if ids is not None else None
    out, lse = ops.flash_attention_forward(q, k, v, True, None, ranges)
    dout = torch.randn(out.shape, generator=gen).to("cuda", BF16)
    dlse = torch.randn(lse.shape, generator=gen).cuda()
    dq, dk, dv = ops.flash_attention_backward(dout, q, k, v, out, lse, True, None, ranges, dlse=dlse)
    qr, kr, vr = (t.detach().float().requires_grad_(True) for t in (q, k, v))
    ref, ref_lse = reference.attention_with_lse(qr, kr, vr, True, d ** -0.5, ids)
    torch.autograd.backward((ref, ref_lse), (dout.float(), dlse))
    assert rel(out, ref) < 1e-2
    for got, want in ((dq, qr.grad), (dk, kr.grad), (dv, vr.grad)):
        assert rel(got, want) < 2e-2


@pytest.mark.gpu
def test_rows_that_see_nothing_and_unequal_lengths():
    """sq != sk (bottom-right causal alignment): queries beyond the keys' reach get out 0, lse -inf."""
    _need_ext()
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, 150, 4, 64, generator=gen).to("cuda", BF16)
    k = torch.randn(1, 100, 2, 64, generator=gen).to("cuda", BF16)
    v = torch.randn(1, 100, 2, 64, generator=gen).to("cuda", BF16)
    out, lse = ops.flash_attention_forward(q, k, v, True, 0.125)
    ref, ref_lse = reference.attention_with_lse(q.float(), k.float(), v.float(), True, 0.125)
    assert (out[:, :50] == 0).all() and torch.isneginf(lse[:, :, :50]).all()
    assert rel(out, ref) < 1e-2
    assert (lse[:, :, 50:] - ref_lse[:, :, 50:]).abs().max().item() < 2e-2
    dout = torch.randn(out.shape, generator=gen).to("cuda", BF16)
    dq, dk, dv = ops.flash_attention_backward(dout, q, k, v, out, lse, True, 0.125)
    assert torch.isfinite(dq).all() and (dq[:, :50] == 0).all()
    qr, kr, vr = (t.detach().float().requires_grad_(True) for t in (q, k, v))
    r, _ = reference.attention_with_lse(qr, kr, vr, True, 0.125)
    r.backward(dout.float())
    for got, want in ((dq, qr.grad), (dk, kr.grad), (dv, vr.grad)):
        assert rel(got, want) < 2e-2
    long_q = torch.randn(1, 64, 4, 64, device="cuda", dtype=BF16)
    out, lse = ops.flash_attention_forward(long_q, k, v, False, 0.125)  # sq < sk, not causal
    ref, ref_lse = reference.attention_with_lse(long_q.float(), k.float(), v.float(), False, 0.125)
    assert rel(out, ref) < 1e-2


@pytest.mark.gpu
def test_door_takes_the_kernel_for_documents_and_is_deterministic():
    _need_ext()
    gen = torch.Generator().manual_seed(5)
    q, k, v = make_inputs(2, 1024, 28, 4, 128, "model", gen)
    ids = random_documents(2, 1024, "mixed", gen).cuda()
    own = "kernel_sm90" if attn.hopper_kernel_available() else "kernel"
    assert attn.backend(q, k, v, True, ids) == own
    assert attn.backend(q.float(), k.float(), v.float(), True, ids) == "sdpa_masked"
    assert attn.backend(q, k, v, True) in (own, "sdpa", "flash_attn")
    outs = []
    for _ in range(2):
        qg, kg, vg = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
        o = ops.attention(qg, kg, vg, causal=True, document_ids=ids)
        o.backward(torch.ones_like(o))
        outs.append((o, kg.grad, vg.grad))
    # dk / dv are reduced without atomics: bitwise reproducible; dq uses fp32 atomics
    for a, b in zip(outs[0], outs[1]):
        assert torch.equal(a, b)
    ref = reference.attention(q.float(), k.float(), v.float(), True, None, ids)
    assert rel(outs[0][0], ref) < 1e-2


@pytest.mark.gpu
def test_the_default_build_holds_the_hopper_kernels():
    """setup.py's default target is sm_90a, and the module says the Hopper kernels are in it."""
    _need_ext()
    if os.environ.get("MEGATRON_QWEN2_GENCODE"):
        pytest.skip(f"built for MEGATRON_QWEN2_GENCODE={os.environ['MEGATRON_QWEN2_GENCODE']}")
    assert extension.load().hopper_kernels is True


@pytest.mark.gpu
def test_door_and_functional_pair_run_the_hopper_kernel_on_hopper():
    """On compute capability 9.0 packed documents and the context-parallel pair take the Hopper
    kernels: their results are those ops' own, bit for bit (out, lse, dk, dv)."""
    _need_ext()
    if not attn.hopper_kernel_available():
        pytest.skip(f"compute capability {torch.cuda.get_device_capability()}: the Hopper kernel is not for it")
    from megatron_qwen2.ops import library

    gen = torch.Generator().manual_seed(17)
    q, k, v = make_inputs(2, 500, 8, 2, 64, "model", gen)
    ids = random_documents(2, 500, "mixed", gen).cuda()
    ranges = attn.document_ranges(ids)
    assert "kernel_sm90" in attn.backend_reason(q, k, v, True, ids)
    with torch.no_grad():  # one sequence per row: the Hopper forward for forward-only calls, cuDNN to train
        assert attn.backend(q, k, v, True) == "kernel_sm90"
    assert attn.backend(q.detach().requires_grad_(True), k, v, True) == "sdpa"
    want_out, want_lse = library.flash_attention_sm90(q, k, v, True, 0.125, *ranges)
    assert torch.equal(ops.attention(q, k, v, True, 0.125, ids), want_out)
    out, lse = ops.flash_attention_forward(q, k, v, True, 0.125, ranges)
    assert torch.equal(out, want_out) and torch.equal(lse, want_lse)
    dout = torch.randn(out.shape, generator=gen).to("cuda", BF16)
    _, dk, dv = ops.flash_attention_backward(dout, q, k, v, out, lse, True, 0.125, ranges)
    _, want_dk, want_dv = library.flash_attention_backward_sm90(dout, q, k, v, out, lse, None, True, 0.125,
                                                               ranges.query_lo, ranges.query_hi)
    assert torch.equal(dk, want_dk) and torch.equal(dv, want_dv)


@pytest.mark.gpu
def test_unaligned_and_odd_strided_inputs_are_copied():
    """Rows that are not 16-byte aligned (an odd storage offset) take a contiguous copy; results match."""
    _need_ext()
    from megatron_qwen2.ops import library

    gen = torch.Generator().manual_seed(13)
    b, s, hq, hkv, d = 2, 90, 4, 2, 64
    flat = torch.randn(b * s * (hq + 2 * hkv) * d + 1, generator=gen).to("cuda", BF16)
    qkv = flat[1:].view(b, s, hq + 2 * hkv, d)  # every row starts 2 bytes past a 16-byte boundary
    q, k, v = qkv[:, :, :hq], qkv[:, :, hq:hq + hkv], qkv[:, :, hq + hkv:]
    out, lse = library.flash_attention(q, k, v, True, d ** -0.5)
    ref, ref_lse = reference.attention_with_lse(q.float(), k.float(), v.float(), True, d ** -0.5)
    assert rel(out, ref) < 1e-2 and (lse - ref_lse).abs().max().item() < 2e-2
    assert out.is_contiguous()


@pytest.mark.gpu
def test_bad_inputs_name_the_value():
    _need_ext()
    from megatron_qwen2.ops import library

    q = torch.randn(1, 8, 4, 96, device="cuda", dtype=BF16)
    with pytest.raises(RuntimeError, match="head_dim must be 64 or 128, got 96"):
        library.flash_attention(q, q[:, :, :2], q[:, :, :2], True, 0.1, None, None)
    q = torch.randn(1, 8, 6, 64, device="cuda", dtype=BF16)
    k = torch.randn(1, 8, 4, 64, device="cuda", dtype=BF16)
    with pytest.raises(RuntimeError, match="query heads 6 are not a multiple of kv heads 4"):
        library.flash_attention(q, k, k, True, 0.1, None, None)


@pytest.mark.gpu
def test_custom_op_passes_opcheck():
    _need_ext()
    from megatron_qwen2.ops import library

    gen = torch.Generator().manual_seed(11)
    q, k, v = make_inputs(2, 70, 4, 2, 64, "contiguous", gen)
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    ids = random_documents(2, 70, "mixed", gen).cuda()
    torch.library.opcheck(library.flash_attention, (q, k, v, True, 0.125, *attn.document_ranges(ids)))
    torch.library.opcheck(library.flash_attention, (q, k, v, False, 0.125))
    out, lse = library.flash_attention(q, k, v, True, 0.125)
    args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), None, True, 0.125)
    torch.library.opcheck(library.flash_attention_backward, args)


@pytest.mark.gpu
def test_kernel_blocks_merge_like_context_parallelism():
    """Two K/V blocks (a query block against a key block of other positions: document_ranges of two
    id arrays), merged by lse; the per-block backward from the merged out / lse sums to the full one."""
    _need_ext()
    gen = torch.Generator().manual_seed(9)
    b, s, hq, hkv, d, cut = 2, 700, 8, 2, 128, 300
    q, k, v = make_inputs(b, s, hq, hkv, d, "model", gen)
    ids = random_documents(b, s, "mixed", gen).cuda()
    blocks, parts, out, lse = _two_block_attention(q, k, v, ids, cut, d ** -0.5)
    ref, ref_lse = reference.attention_with_lse(q.float(), k.float(), v.float(), False, d ** -0.5, ids)
    assert rel(out, ref) < 1e-2
    assert (lse - ref_lse).abs().max().item() < 2e-2
    dout = torch.randn(out.shape, generator=gen).to("cuda", BF16)
    grads = [ops.flash_attention_backward(dout, q, k[:, blk], v[:, blk], out, lse, False, None, ranges)
             for blk, (ranges, _, _) in zip(blocks, parts)]
    qr, kr, vr = (t.detach().float().requires_grad_(True) for t in (q, k, v))
    reference.attention_with_lse(qr, kr, vr, False, d ** -0.5, ids)[0].backward(dout.float())
    assert rel(grads[0][0].float() + grads[1][0].float(), qr.grad) < 2e-2
    assert rel(torch.cat([grads[0][1], grads[1][1]], 1), kr.grad) < 2e-2
    assert rel(torch.cat([grads[0][2], grads[1][2]], 1), vr.grad) < 2e-2
