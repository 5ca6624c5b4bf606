"""The Hopper flash-attention kernels (csrc/flash_attn_sm90.cu, csrc/flash_attn_sm90_bwd.cu,
`library.flash_attention_sm90` / `library.flash_attention_backward_sm90`) against the fp32
reference and against the FA2-style kernel (`library.flash_attention` / `flash_attention_backward`).

Cases: head dims 128 / 64, query / kv heads 28/4, 14/2, 16/4, 8/2, 8/8, 4/1 (ratios 7, 4 and 1),
causal and not, sq == sk, sq < sk (bottom-right causal alignment, a query block of the last positions
as under context parallelism) and sq > sk (rows that see nothing), packed documents (one-token
documents, lengths that are not multiples of the 128-row tiles), lengths that are not tile
multiples, fewer keys than one 128-key block of the backward (the second consumer's keys partly or
wholly beyond sk), batch 2, and q / k / v as strided views of one packed qkv tensor or of the
model's [s, b, ...] projection. The backward also takes the lse gradient and a strided dout, and its
dk / dv are reproducible.

Bounds: out against the fp32 reference within 1e-2 relative (the bound of test_flash_attention.py:
both kernels round P to bf16 before P V and write bf16), lse within 2e-2 absolute (it is O(log s));
against the FA2-style kernel, which rounds the same way at other tile boundaries, out within 1e-2
relative and lse within 1e-3 absolute (both take lse from the fp32 scores and fp32 sums: only the
summation order differs). Rows that see no key must be exactly 0 with lse -inf, as in the FA2 kernel.
Gradients against the fp32 reference within 2e-2 relative (test_flash_attention.py's bound: P and dS
are rounded to bf16 before their products) and against the FA2-style backward, from the same out and
lse, within 1e-2; the dq of a query that sees no key is exactly 0.
"""

import importlib

import pytest
import torch

from megatron_qwen2.ops import extension, reference
from tests.ops.test_flash_attention import make_inputs as fa2_inputs
from tests.ops.test_flash_attention import random_documents, rel

attn = importlib.import_module("megatron_qwen2.ops.attention")

pytestmark = pytest.mark.gpu
BF16 = torch.bfloat16


@pytest.fixture(autouse=True)
def _need_hopper_kernel():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip(f"the sm90 kernel runs on compute capability 9.0 only, this is {torch.cuda.get_device_capability()}")
    ext = extension.load()
    if ext is None or not ext.hopper_kernels:
        pytest.skip("megatron_qwen2._C is not built with the sm90 attention kernels (an sm_90a target)")


def make_inputs(b, sq, sk, hq, hkv, d, layout, gen):
    """q [b, sq, hq, d], k / v [b, sk, hkv, d] bf16 on CUDA. 'packed': views of one [b, s, hq + 2 hkv, d]
    tensor; 'model' (the model's [s, b, ...] projection) and 'contiguous' as in test_flash_attention.py
    (sq == sk); sq != sk: separate tensors."""
    if layout == "packed":
        qkv = torch.randn(b, sq, hq + 2 * hkv, d, generator=gen).to("cuda", BF16)
        return qkv[:, :, :hq], qkv[:, :, hq:hq + hkv], qkv[:, :, hq + hkv:]
    if sq == sk:
        return fa2_inputs(b, sq, hq, hkv, d, layout, gen)
    q = torch.randn(b, sq, hq, d, generator=gen).to("cuda", BF16)
    kv = torch.randn(2, b, sk, hkv, d, generator=gen).to("cuda", BF16)
    return q, kv[0], kv[1]


def ranges_for(b, sq, sk, docs, gen):
    """(DocumentRanges or None, key_ranges for the reference or None). With sq < sk the queries are
    the last sq positions of the sk keys' row (context parallelism's block of the row's end)."""
    if docs == "none":
        return None, None
    ids = random_documents(b, sk, docs, gen).cuda()
    ranges = attn.document_ranges(ids[:, sk - sq:], ids) if sq != sk else attn.document_ranges(ids)
    return ranges, (ranges.key_lo, ranges.key_hi)


CASES = [
    # b, sq, sk, hq, hkv, d, documents, layout
    (2, 1000, 1000, 28, 4, 128, "none", "packed"),
    (2, 1000, 1000, 14, 2, 64, "none", "model"),
    (1, 384, 384, 8, 8, 128, "none", "contiguous"),
    (2, 1000, 1000, 28, 4, 128, "mixed", "packed"),
    (2, 777, 777, 14, 2, 64, "mixed", "contiguous"),
    (2, 1000, 1000, 8, 8, 128, "mixed", "model"),
    (2, 300, 300, 14, 2, 128, "ones", "packed"),
    (2, 200, 1000, 28, 4, 128, "none", "contiguous"),
    (2, 333, 1000, 14, 2, 64, "mixed", "contiguous"),
    (1, 1, 513, 8, 8, 128, "none", "contiguous"),
    (1, 150, 100, 8, 8, 64, "none", "contiguous"),
    (2, 190, 70, 28, 4, 128, "none", "contiguous"),
    (2, 1000, 1000, 16, 4, 64, "none", "model"),
    (2, 777, 777, 8, 2, 64, "mixed", "contiguous"),
    (2, 50, 50, 4, 1, 64, "mixed", "packed"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("causal", [True, False])
def test_sm90_forward_matches_reference_and_fa2_kernel(case, causal):
    from megatron_qwen2.ops import library

    b, sq, sk, hq, hkv, d, docs, layout = case
    gen = torch.Generator().manual_seed(sum(x for x in case if isinstance(x, int)) + 7 * causal)
    q, k, v = make_inputs(b, sq, sk, hq, hkv, d, layout, gen)
    ranges, key_ranges = ranges_for(b, sq, sk, docs, gen)
    scale = d ** -0.5 * 1.3
    args = (q, k, v, causal, scale, *(ranges or (None,) * 4))
    out, lse = library.flash_attention_sm90(*args)
    assert out.shape == q.shape and out.dtype == BF16 and lse.shape == (b, hq, sq) and lse.dtype == torch.float32
    fa2_out, fa2_lse = library.flash_attention(*args)
    ref, ref_lse = reference.attention_with_lse(q.float(), k.float(), v.float(), causal, scale, key_ranges=key_ranges)

    blind = torch.isneginf(ref_lse)  # rows that see no key: out 0, lse -inf
    assert torch.equal(torch.isneginf(lse), blind)
    assert (out.transpose(1, 2)[blind] == 0).all()
    seen = ~blind
    assert rel(out, ref) < 1e-2
    assert (lse[seen] - ref_lse[seen]).abs().max().item() < 2e-2
    assert rel(out, fa2_out) < 1e-2
    assert (lse[seen] - fa2_lse[seen]).abs().max().item() < 1e-3


def test_sm90_forward_is_deterministic_and_feeds_the_backward():
    """Two calls give the same bits; the custom op's backward (the sm90 kernel's, from out and lse)
    gives the reference gradients."""
    from megatron_qwen2.ops import library

    gen = torch.Generator().manual_seed(5)
    b, s, hq, hkv, d = 2, 700, 14, 2, 128
    q, k, v = make_inputs(b, s, s, hq, hkv, d, "packed", gen)
    ranges, key_ranges = ranges_for(b, s, s, "mixed", gen)
    first = library.flash_attention_sm90(q, k, v, True, d ** -0.5, *ranges)
    second = library.flash_attention_sm90(q, k, v, True, d ** -0.5, *ranges)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    qg, kg, vg = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out, _ = library.flash_attention_sm90(qg, kg, vg, True, d ** -0.5, *ranges)
    dout = torch.randn(out.shape, generator=gen).to("cuda", BF16)
    out.backward(dout)
    qr, kr, vr = (t.detach().float().requires_grad_(True) for t in (q, k, v))
    reference.attention_with_lse(qr, kr, vr, True, d ** -0.5, key_ranges=key_ranges)[0].backward(dout.float())
    for got, want in ((qg.grad, qr.grad), (kg.grad, kr.grad), (vg.grad, vr.grad)):
        assert rel(got, want) < 2e-2


def test_sm90_forward_rejects_what_the_fa2_forward_rejects():
    from megatron_qwen2.ops import library

    q = torch.randn(1, 8, 4, 96, device="cuda", dtype=BF16)
    with pytest.raises(RuntimeError, match="flash_attention_forward_sm90: head_dim must be 64 or 128, got 96"):
        library.flash_attention_sm90(q, q[:, :, :2], q[:, :, :2], True, 0.1)


def reference_grads(q, k, v, causal, scale, key_ranges, dout, dlse=None):
    qr, kr, vr = (t.detach().float().requires_grad_(True) for t in (q, k, v))
    out, lse = reference.attention_with_lse(qr, kr, vr, causal, scale, key_ranges=key_ranges)
    if dlse is None:
        out.backward(dout.float())
    else:
        torch.autograd.backward((out, lse), (dout.float(), dlse))
    return qr.grad, kr.grad, vr.grad, lse


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("causal", [True, False])
def test_sm90_backward_matches_reference_and_fa2_kernel(case, causal):
    from megatron_qwen2.ops import library

    b, sq, sk, hq, hkv, d, docs, layout = case
    gen = torch.Generator().manual_seed(3 * sum(x for x in case if isinstance(x, int)) + causal)
    q, k, v = make_inputs(b, sq, sk, hq, hkv, d, layout, gen)
    ranges, key_ranges = ranges_for(b, sq, sk, docs, gen)
    scale = d ** -0.5 * 1.3
    out, lse = library.flash_attention(q, k, v, causal, scale, *(ranges or (None,) * 4))
    dout = torch.randn(out.shape, generator=gen).to("cuda", BF16)
    query_ranges = (ranges.query_lo, ranges.query_hi) if ranges else (None, None)
    args = (dout, q, k, v, out, lse, None, causal, scale, *query_ranges)
    dq, dk, dv = library.flash_attention_backward_sm90(*args)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    assert dq.dtype == dk.dtype == dv.dtype == BF16
    fa2 = library.flash_attention_backward(*args)
    ref = reference_grads(q, k, v, causal, scale, key_ranges, dout)
    for got, other, want in zip((dq, dk, dv), fa2, ref):
        assert rel(got, want) < 2e-2
        assert rel(got, other) < 1e-2
    blind = torch.isneginf(ref[3]).transpose(1, 2)  # [b, sq, hq]: queries that see no key
    assert (dq[blind] == 0).all()


@pytest.mark.parametrize("docs", ["none", "mixed"])
def test_sm90_backward_takes_the_lse_gradient_and_a_strided_dout(docs):
    """d(out, lse): the lse gradient enters through delta; dout a transposed view of a [s, b, ...]
    buffer (the kernel reads it in place)."""
    from megatron_qwen2.ops import library

    gen = torch.Generator().manual_seed(17)
    b, s, hq, hkv, d = 2, 333, 8, 2, 128
    q, k, v = make_inputs(b, s, s, hq, hkv, d, "model", gen)
    ranges, key_ranges = ranges_for(b, s, s, docs, gen)
    out, lse = library.flash_attention(q, k, v, True, d ** -0.5, *(ranges or (None,) * 4))
    dout = torch.randn(s, b, hq, d, generator=gen).to("cuda", BF16).transpose(0, 1)
    dlse = torch.randn(lse.shape, generator=gen).cuda()
    query_ranges = (ranges.query_lo, ranges.query_hi) if ranges else (None, None)
    args = (dout, q, k, v, out, lse, dlse, True, d ** -0.5, *query_ranges)
    got = library.flash_attention_backward_sm90(*args)
    fa2 = library.flash_attention_backward(*args)
    ref = reference_grads(q, k, v, True, d ** -0.5, key_ranges, dout, dlse)
    for g, other, want in zip(got, fa2, ref):
        assert rel(g, want) < 2e-2
        assert rel(g, other) < 1e-2


def test_sm90_backward_reproduces_dk_dv_and_passes_opcheck():
    """dk / dv are written without atomics (GQA partials summed in a fixed order): two calls give
    the same bits; dq, summed with fp32 atomics, agrees closely. The op's fake matches the kernel."""
    from megatron_qwen2.ops import library

    gen = torch.Generator().manual_seed(23)
    b, s, hq, hkv, d = 2, 700, 14, 2, 64
    q, k, v = make_inputs(b, s, s, hq, hkv, d, "packed", gen)
    ranges, _ = ranges_for(b, s, s, "mixed", gen)
    out, lse = library.flash_attention(q, k, v, True, d ** -0.5, *ranges)
    dout = torch.randn(out.shape, generator=gen).to("cuda", BF16)
    args = (dout, q, k, v, out, lse, None, True, d ** -0.5, ranges.query_lo, ranges.query_hi)
    first = library.flash_attention_backward_sm90(*args)
    second = library.flash_attention_backward_sm90(*args)
    assert torch.equal(first[1], second[1]) and torch.equal(first[2], second[2])
    assert rel(first[0], second[0]) < 1e-3
    torch.library.opcheck(library.flash_attention_backward_sm90, args)
