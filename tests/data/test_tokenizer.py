"""The repository tokenizer: small, byte-level (any text round-trips), Qwen2's special tokens; clear load errors."""

import shutil

import pytest
from tokenizers import Tokenizer, models

from megatron_qwen2.data import (REPO_TOKENIZER, SPECIAL_TOKENS, corpus_files, eod_token_id, load_tokenizer,
                                 read_document, train_bpe_tokenizer)
from megatron_qwen2.errors import DataError

TEXTS = [
    "def f(x):\n    return x ** 2  # squares\n",
    "héllo wörld — “quotes” ½ ∑ 日本語のテキスト 🤖🚀 한국어\n",
    "tabs\tand\r\nCRLF\r\n   trailing spaces   \n\n\n",
    "\x00\x01 control \u200b zero-width \ufeff bom, combining e\u0301, 12345678901234567890",
    "literal <|endoftext|> in text",
    "",
]


def test_repo_tokenizer_is_small_with_expected_special_tokens():
    assert REPO_TOKENIZER.stat().st_size < 1_000_000
    tok = load_tokenizer(None)
    assert tok.get_vocab_size() == 4096
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2]
    assert SPECIAL_TOKENS == ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
    assert eod_token_id(tok) == 0


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(text):
    tok = load_tokenizer(None)
    ids = tok.encode(text, add_special_tokens=False).ids
    assert max(ids, default=0) < 4096
    assert tok.decode(ids, skip_special_tokens=False) == text


def test_code_compresses():
    tok = load_tokenizer(None)
    text = "import os\n\nclass Foo(object):\n    def __init__(self, name):\n        self.name = name\n"
    assert len(tok.encode(text).ids) < len(text) / 2.5


def test_load_from_directory_and_file(tmp_path):
    shutil.copy(REPO_TOKENIZER, tmp_path / "tokenizer.json")
    assert load_tokenizer(str(tmp_path)).to_str() == load_tokenizer(None).to_str()
    assert load_tokenizer(tmp_path / "tokenizer.json").get_vocab_size() == 4096


def test_missing_and_invalid_paths_are_named(tmp_path):
    with pytest.raises(DataError, match="nowhere"):
        load_tokenizer(str(tmp_path / "nowhere.json"))
    with pytest.raises(DataError, match="tokenizer.json"):
        load_tokenizer(str(tmp_path))  # a directory without tokenizer.json
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(DataError, match="broken.json"):
        load_tokenizer(str(tmp_path / "broken.json"))


def test_eod_missing_names_the_tokenizer(tmp_path):
    path = tmp_path / "no_eod.json"
    Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(path))
    with pytest.raises(ValueError, match="no_eod.json.*<\\|endoftext\\|>"):
        eod_token_id(load_tokenizer(path))


def test_training_is_deterministic():
    texts = [t for t in map(read_document, corpus_files("stdlib", 20)) if t]
    a, b = train_bpe_tokenizer(texts, 600), train_bpe_tokenizer(texts, 600)
    assert a.to_str() == b.to_str()
    assert a.get_vocab_size() == 600 and [a.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2]
    assert a.decode(a.encode(TEXTS[1]).ids) == TEXTS[1]
    with pytest.raises(ValueError, match="vocab_size=100"):
        train_bpe_tokenizer(texts, 100)
