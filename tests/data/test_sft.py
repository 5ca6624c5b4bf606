"""SFT data: Qwen2 chat template, loss on assistant turns only, chat tokens added when a tokenizer lacks them."""

import json
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from megatron_qwen2.config import DataConfig
from megatron_qwen2.data import build_datasets, ensure_chat_tokens, load_tokenizer, render_chat
from megatron_qwen2.data.sft import load_conversations

CHAT = Path(__file__).resolve().parent / "assets" / "chat.jsonl"


def template(messages):
    """Qwen2's chat template, as the Jinja in its tokenizer_config.json renders it (no generation prompt)."""
    out = "" if messages[0]["role"] == "system" else "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    return out + "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)


def test_render_matches_the_template_and_masks_assistant_turns():
    tok = load_tokenizer()
    records = [json.loads(line) for line in CHAT.read_text().splitlines()]
    for rec in records:
        ids, mask = render_chat(rec["messages"], tok)
        assert tok.decode(ids.tolist(), skip_special_tokens=False) == template(rec["messages"])
        learned = tok.decode(ids[mask].tolist(), skip_special_tokens=False)
        assert learned == "".join(m["content"] + "<|im_end|>" for m in rec["messages"] if m["role"] == "assistant")
        # A literal "<|im_end|>" inside a message is text: one control token per turn.
        turns = len(rec["messages"]) + (rec["messages"][0]["role"] != "system")
        assert (ids == tok.token_to_id("<|im_end|>")).sum() == turns
    with pytest.raises(ValueError, match="role"):
        render_chat([{"role": "robot", "content": "hi"}], tok)


def test_samples_are_padded_and_the_loss_mask_is_shifted_to_labels():
    tok = load_tokenizer()
    convs = load_conversations(CHAT, tok)
    train, valid = build_datasets(DataConfig(format="sft", paths=[str(CHAT)], split=[10, 2]), 64, seed=3)
    assert len(train) == 10 and len(valid) == 2
    batch = train.batch_at(0, len(train))
    assert batch.document_ids is None and batch.position_ids is None
    seen = set()
    for row in range(len(batch)):
        tokens, mask = batch.tokens[row], batch.loss_mask[row].bool()
        labels = tokens[1:][mask].tolist()
        conv = next(i for i, (ids, _) in enumerate(convs)
                    if np.array_equal(ids[:65], tokens[:min(len(ids), 65)].numpy()))
        seen.add(conv)
        ids, amask = convs[conv]
        assert labels == ids[1:65][amask[1:65]].tolist()  # exactly the assistant tokens within the window
        assert not mask[len(ids) - 1:].any()  # padding never counts
    assert seen == set(range(10))  # one epoch = each training conversation once


def test_tokenizer_without_chat_tokens_gets_them(tmp_path):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["hello world, how are you?"] * 20, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    before = tok.get_vocab_size()
    assert tok.token_to_id("<|im_start|>") is None
    ensure_chat_tokens(tok)
    assert tok.get_vocab_size() == before + 2
    assert {tok.token_to_id("<|im_start|>"), tok.token_to_id("<|im_end|>")} == {before, before + 1}
    ids, _ = render_chat([{"role": "user", "content": "<|im_start|>hi"}], tok)
    assert (ids == before).sum() == 2  # the two turn openers, not the text in the message
    train, _ = build_datasets(DataConfig(format="sft", paths=[str(CHAT)], tokenizer=str(path)), 32, seed=1)
    assert train.vocab_size == before + 2 and int(train.batch_at(0, 12).tokens.max()) < before + 2


def test_packed_rows_hold_whole_conversations_as_documents():
    tok = load_tokenizer()
    convs = load_conversations(CHAT, tok)[:10]  # the training split of split=[10, 2]
    seq = 256
    train, _ = build_datasets(DataConfig(format="sft", paths=[str(CHAT)], split=[10, 2], sft_packing=True), seq,
                              seed=3)
    assert len(train) < 10  # several conversations per row
    batch = train.batch_at(0, len(train))
    eod = tok.token_to_id("<|endoftext|>")
    found = []
    for row in range(len(batch)):
        tokens, docs, pos = batch.tokens[row], batch.document_ids[row], batch.position_ids[row]
        mask = batch.loss_mask[row].bool()
        starts = [0] + [j for j in range(1, seq) if docs[j] != docs[j - 1]]
        for a in starts:
            match = next((i for i, (ids, _) in enumerate(convs)
                          if np.array_equal(tokens[a:a + len(ids)].numpy(), ids)), None)
            if match is None:  # the padding after the last conversation: one document, never learned
                assert (tokens[a:] == eod).all() and not mask[a:].any()
                continue
            ids, amask = convs[match]
            found.append(match)
            end = min(a + len(ids), seq)
            assert (docs[a:end] == docs[a]).all() and pos[a:end].tolist() == list(range(end - a))
            # labels j in [a, a + len - 1) are this conversation's: exactly its assistant tokens count
            assert tokens[a + 1:a + len(ids)][mask[a:a + len(ids) - 1]].tolist() == ids[1:][amask[1:]].tolist()
    assert sorted(found) == list(range(10))  # one epoch = each conversation once, whole


def test_packed_loss_equals_the_conversations_alone():
    import torch

    from megatron_qwen2.config import ModelConfig
    from megatron_qwen2.model import Qwen2Model

    tok = load_tokenizer()
    convs = load_conversations(CHAT, tok)[:10]
    train, _ = build_datasets(DataConfig(format="sft", paths=[str(CHAT)], split=[10, 2], sft_packing=True), 256,
                              seed=3)
    torch.manual_seed(0)
    model = Qwen2Model(ModelConfig(hidden_size=64, num_layers=2, num_attention_heads=4, num_kv_heads=2,
                                   ffn_hidden_size=96, vocab_size=tok.get_vocab_size(), max_position_embeddings=512))
    batch = train.batch_at(0, len(train))
    with torch.no_grad():
        out = model(batch.tokens[:, :-1], batch.position_ids, labels=batch.tokens[:, 1:],
                    document_ids=batch.document_ids)
        packed = (out.token_loss * batch.loss_mask).sum().item()
        alone = 0.0
        for ids, amask in convs:
            t = torch.from_numpy(ids)[None]
            loss = model(t[:, :-1], labels=t[:, 1:]).token_loss
            alone += (loss * torch.from_numpy(amask[1:]).float()).sum().item()
    assert packed == pytest.approx(alone, rel=1e-5)


def test_packing_needs_the_sft_format():
    with pytest.raises(ValueError, match="sft_packing"):
        DataConfig(sft_packing=True).validate()
