"""Packed documents stay apart: with document ids and restarted positions, a document's logits are
those it would have alone, whatever shares its row."""

import torch
import torch.nn.functional as F

from megatron_qwen2 import ops
from megatron_qwen2.config import ModelConfig
from megatron_qwen2.model import Qwen2Model


def tiny_model():
    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=32, num_layers=2, num_attention_heads=4, num_kv_heads=2, ffn_hidden_size=64,
                      vocab_size=128)
    model = Qwen2Model(cfg)
    model.init_weights(seed=5)
    return model.eval()


def packed_row(doc_a, doc_b):
    ids = torch.tensor([doc_a + doc_b])
    docs = torch.tensor([[0] * len(doc_a) + [1] * len(doc_b)])
    pos = torch.tensor([list(range(len(doc_a))) + list(range(len(doc_b)))])
    return ids, pos, docs


@torch.no_grad()
def test_document_logits_do_not_see_their_row_neighbours():
    model = tiny_model()
    doc_a, doc_a2, doc_b = [5, 6, 7, 8, 9, 10, 11], [90, 3, 44], [20, 21, 22, 23, 24, 25, 26, 27, 28]
    ids, pos, docs = packed_row(doc_a, doc_b)
    logits = model(ids, pos, document_ids=docs)[0]  # [s, V]
    alone_b = model(torch.tensor([doc_b]))[0]
    alone_a = model(torch.tensor([doc_a]))[0]
    torch.testing.assert_close(logits[len(doc_a):], alone_b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits[:len(doc_a)], alone_a, rtol=1e-5, atol=1e-5)
    # Another first document (of another length) leaves the second one's logits as they were.
    ids2, pos2, docs2 = packed_row(doc_a2, doc_b)
    torch.testing.assert_close(model(ids2, pos2, document_ids=docs2)[0][len(doc_a2):], alone_b, rtol=1e-5, atol=1e-5)
    # Without the mask the second document does see the first.
    unmasked = model(ids, pos)[0]
    assert (unmasked[len(doc_a):] - alone_b).abs().max() > 1e-3


def test_attention_mask_is_block_diagonal_causal():
    torch.manual_seed(1)
    b, s, hq, hkv, d = 2, 10, 4, 2, 8
    q, k, v = torch.randn(b, s, hq, d, dtype=torch.float64), torch.randn(b, s, hkv, d, dtype=torch.float64), \
        torch.randn(b, s, hkv, d, dtype=torch.float64)
    docs = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2, 2], [0] * 10])
    out = ops.attention(q, k, v, causal=True, document_ids=docs)
    for row in range(b):
        for doc in docs[row].unique():
            sel = (docs[row] == doc).nonzero().squeeze(1)
            qs, ks, vs = (t[row:row + 1, sel].transpose(1, 2) for t in (q, k, v))
            ks, vs = ks.repeat_interleave(hq // hkv, dim=1), vs.repeat_interleave(hq // hkv, dim=1)
            want = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True).transpose(1, 2)[0]
            torch.testing.assert_close(out[row, sel], want)
    # One document per row is the plain causal attention.
    torch.testing.assert_close(out[1], ops.attention(q, k, v, causal=True)[1])
