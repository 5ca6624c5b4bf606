"""Preference data: both TRL forms rendered as SFT renders a conversation, a pair as two documents of
one row with the labels of each response marked, the documented cut, errors naming file and line."""

import json
from pathlib import Path

import numpy as np
import torch
import pytest

from megatron_qwen2.config import DataConfig
from megatron_qwen2.data import build_datasets, ensure_chat_tokens, load_tokenizer, render_chat
from megatron_qwen2.data.preference import PreferenceDataset, cut_lengths, load_pairs, render_pair
from megatron_qwen2.errors import DataError

PREFERENCE = Path(__file__).resolve().parent / "assets" / "preference.jsonl"


@pytest.fixture(scope="module")
def tok():
    return ensure_chat_tokens(load_tokenizer(None))


def test_both_forms_render_as_the_sft_conversation_and_count_the_response_only(tok):
    as_strings = {"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go away."}
    as_messages = {"prompt": [{"role": "user", "content": "Hi?"}],
                   "chosen": [{"role": "assistant", "content": "Hello."}],
                   "rejected": [{"role": "assistant", "content": "Go away."}]}
    a, b = render_pair(as_strings, tok, "x"), render_pair(as_messages, tok, "x")
    for field in ("prompt", "chosen", "chosen_mask", "rejected", "rejected_mask"):
        assert np.array_equal(getattr(a, field), getattr(b, field))
    ids, mask = render_chat(as_messages["prompt"] + as_messages["chosen"], tok)
    assert np.array_equal(np.concatenate([a.prompt, a.chosen]), ids)  # the default system prompt included
    assert tok.decode(a.chosen[a.chosen_mask].tolist(), skip_special_tokens=False) == "Hello.<|im_end|>"
    # An assistant turn of the prompt only conditions.
    record = json.loads(PREFERENCE.read_text().splitlines()[2])
    pair = render_pair(record, tok, "x")
    full, full_mask = render_chat(record["prompt"] + record["rejected"], tok)
    assert full_mask[:len(pair.prompt)].any() and np.array_equal(full[len(pair.prompt):], pair.rejected)
    assert tok.decode(pair.rejected[pair.rejected_mask].tolist(), skip_special_tokens=False) == "9.<|im_end|>"


def test_a_row_holds_chosen_then_rejected_as_documents_with_their_labels(tok):
    train, _ = build_datasets(DataConfig(format="preference", paths=[str(PREFERENCE)]), 256, seed=1)
    pairs = load_pairs(PREFERENCE, tok)
    assert len(train) == len(pairs) == 8 and train.truncated == 0
    batch = train.batch_at(0, 8)
    seen = set()
    for row in range(8):
        tokens, side, docs = batch.tokens[row].numpy(), batch.pair_side[row].numpy(), batch.document_ids[row].numpy()
        i = next(k for k, p in enumerate(pairs) if np.array_equal(tokens[:len(p.prompt) + len(p.chosen)],
                                                                  np.concatenate([p.prompt, p.chosen])))
        seen.add(i)
        p = pairs[i]
        n0, n1 = len(p.prompt) + len(p.chosen), len(p.prompt) + len(p.rejected)
        assert np.array_equal(tokens[n0:n0 + n1], np.concatenate([p.prompt, p.rejected]))
        labels = tokens[1:]
        assert labels[side == 1].tolist() == p.chosen[p.chosen_mask].tolist()
        assert labels[side == 2].tolist() == p.rejected[p.rejected_mask].tolist()
        assert np.array_equal(batch.loss_mask[row].numpy() > 0, side > 0)
        assert (docs[:n0] == 0).all() and (docs[n0:n0 + n1] == 1).all() and (docs[n0 + n1:] == 2).all()
        positions = batch.position_ids[row].numpy()
        assert positions[n0] == 0 and positions[n0 + n1 - 1] == n1 - 1  # restart per document
    assert seen == set(range(8))


@pytest.mark.parametrize("lengths,width,kept", [
    ((10, 5, 5), 30, (10, 5, 5)),  # fits
    ((20, 5, 5), 30, (10, 5, 5)),  # the prompt gives way first, down to what the responses leave
    ((20, 30, 2), 40, (10, 18, 2)),  # prompt at W // 4; the short response whole, the long one the rest
    ((20, 30, 30), 40, (10, 10, 10)),  # both long: half each
    ((3, 40, 40), 41, (3, 18, 17)),  # a short prompt is not cut; the chosen gets the odd token
])
def test_cut_lengths(lengths, width, kept):
    assert cut_lengths(*lengths, width) == kept
    p, c, r = kept
    assert 2 * p + c + r <= width


def test_a_long_pair_is_cut_keeping_the_prompt_end_and_the_responses_start(tok):
    pair = render_pair({"prompt": "word " * 40, "chosen": "yes " * 30, "rejected": "no " * 30}, tok, "x")
    ds = PreferenceDataset([pair], 63, seed=0, pad_id=0, vocab_size=tok.get_vocab_size())
    assert ds.truncated == 1
    row = ds.make_rows([[0]])
    p, c, r = cut_lengths(len(pair.prompt), len(pair.chosen), len(pair.rejected), 64)
    tokens = row.tokens[0].numpy()
    assert np.array_equal(tokens[:p], pair.prompt[-p:]) and np.array_equal(tokens[p:p + c], pair.chosen[:c])
    assert np.array_equal(tokens[p + c:2 * p + c], pair.prompt[-p:])
    assert np.array_equal(tokens[2 * p + c:2 * p + c + r], pair.rejected[:r])
    assert (row.pair_side[0] == 1).sum() == pair.chosen_mask[:c].sum() > 0
    assert (row.pair_side[0] == 2).sum() == pair.rejected_mask[:r].sum() > 0


@pytest.mark.parametrize("line,needle", [
    ("{not json", "not valid JSON"),
    ('{"prompt": "a", "chosen": "b"}', "expected an object"),
    ('{"prompt": "a", "chosen": "", "rejected": "c"}', "the chosen response is empty"),
    ('{"prompt": "a", "chosen": "b", "rejected": []}', "'rejected' must be a string or a non-empty list"),
    ('{"prompt": "a", "chosen": [{"role": "user", "content": "b"}], "rejected": "c"}', "'chosen' holds no assistant"),
    ('{"prompt": [{"role": "robot", "content": "a"}], "chosen": "b", "rejected": "c"}', "each message needs a role"),
])
def test_a_bad_line_is_named_with_its_file_and_line(tmp_path, tok, line, needle):
    path = tmp_path / "p.jsonl"
    path.write_text(PREFERENCE.read_text().splitlines()[0] + "\n\n" + line + "\n")
    with pytest.raises(DataError, match=rf"^{path}:3: .*{needle}"):
        load_pairs(path, tok)


def test_packed_rows_hold_whole_pairs_in_slots(tok):
    pairs = load_pairs(PREFERENCE, tok)
    unpacked = PreferenceDataset(pairs, 400, seed=2, pad_id=0, vocab_size=4096)
    packed = PreferenceDataset(pairs, 400, seed=2, pad_id=0, vocab_size=4096, pack=True)
    assert len(packed) < len(pairs) and sorted(i for r in packed.rows for i in r) == list(range(8))
    packed.attach_reference(np.arange(16, dtype=np.float64).reshape(8, 2))
    batch = packed.batch_at(0, len(packed))
    assert batch.pairs.shape == (len(packed), max(len(r) for r in packed.rows))
    seen = []
    for row in range(len(packed)):
        held = [i for i in packed.rows[int(packed.order(np.array([row]))[0])]]
        assert batch.pairs[row].tolist() == [k < len(held) for k in range(batch.pairs.shape[1])]
        alone = unpacked.make_rows([[i] for i in held])
        at = 0
        for slot, i in enumerate(held):  # each slot is the pair's own row, moved along and relabelled
            n = int((alone.document_ids[slot] < 2).sum())  # the pair's tokens
            assert torch.equal(batch.tokens[row, at:at + n], alone.tokens[slot, :n])
            side = alone.pair_side[slot, :n - 1]
            assert torch.equal(batch.pair_side[row, at:at + n - 1], torch.where(side > 0, side + 2 * slot, 0))
            assert batch.reference_logps[row, slot].tolist() == [2.0 * i, 2.0 * i + 1]
            assert set(batch.document_ids[row, at:at + n].tolist()) == {2 * slot, 2 * slot + 1}
            at += n
            seen.append(i)
        assert (batch.pair_side[row, at - 1:] == 0).all()
    assert sorted(seen) == list(range(8))
