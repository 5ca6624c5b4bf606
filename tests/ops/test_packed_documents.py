"""PackedDocuments: the document ids of a micro-batch with the kernel's ranges derived once, taken by
the attention door and the context-parallel ring in place of the ids."""

import importlib

import torch

from megatron_qwen2 import ops

attn = importlib.import_module("megatron_qwen2.ops.attention")  # the module (ops.attention is the door function)


def test_ranges_are_derived_once_and_equal_document_ranges(monkeypatch):
    ids = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2], [0, 1, 1, 1, 1, 1, 2, 2]])
    calls = []
    original = attn.document_ranges
    monkeypatch.setattr(attn, "document_ranges", lambda *a: calls.append(1) or original(*a))
    docs = ops.PackedDocuments(ids)
    first, second = docs.ranges, docs.ranges
    assert first is second and len(calls) == 1
    for got, want in zip(first, original(ids)):
        assert torch.equal(got, want)
    assert ops.packed_documents(docs) is docs and ops.packed_documents(None) is None
    assert ops.packed_documents(ids).ids is ids


def test_attention_takes_packed_documents_like_their_ids():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 8, 4, 16), torch.randn(2, 8, 2, 16), torch.randn(2, 8, 2, 16)
    ids = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2], [0, 1, 1, 1, 1, 1, 2, 2]])
    expected = ops.attention(q, k, v, document_ids=ids)
    torch.testing.assert_close(ops.attention(q, k, v, document_ids=ops.PackedDocuments(ids)), expected, rtol=0, atol=0)
    assert not torch.allclose(ops.attention(q, k, v), expected)  # the documents matter here
    assert attn.backend(q, k, v, document_ids=ops.PackedDocuments(ids)) == attn.backend(q, k, v, document_ids=ids)
