"""Train the repository's byte-level BPE tokenizer.

    python tools/train_tokenizer.py --input stdlib --vocab-size 4096 \
        --output megatron_qwen2/data/assets/tokenizer.json

With the defaults this rebuilds megatron_qwen2/data/assets/tokenizer.json byte for byte on the
Python version that made it (3.11; another version's standard library is another corpus).
The training texts are every `--every`-th file of the corpus, in corpus order.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from megatron_qwen2.data.corpus import corpus_files, read_document  # noqa: E402
from megatron_qwen2.data.tokenizer import REPO_TOKENIZER, SPECIAL_TOKENS, train_bpe_tokenizer  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", default="stdlib", help="corpus: 'stdlib', a file, a directory or a glob")
    parser.add_argument("--vocab-size", type=int, default=4096, help="tokens in all, special tokens included")
    parser.add_argument("--output", default=str(REPO_TOKENIZER), help="where to write tokenizer.json")
    parser.add_argument("--every", type=int, default=2, help="train on every N-th corpus file (default 2)")
    parser.add_argument("--max-files", type=int, default=None, help="cap on corpus files before --every")
    args = parser.parse_args(argv)
    if args.every < 1:
        parser.error(f"--every must be >= 1, got {args.every}")

    try:
        files = corpus_files(args.input, args.max_files)[::args.every]
        texts = [t for t in (read_document(f) for f in files) if t]
        start = time.perf_counter()
        tok = train_bpe_tokenizer(texts, args.vocab_size)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - start

    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(output))
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    print(f"trained on {len(texts)} files ({sum(map(len, texts)) / 1e6:.1f}M characters) in {elapsed:.1f}s: "
          f"{tok.get_vocab_size()} tokens, special {ids}; wrote {output} ({output.stat().st_size / 1024:.0f} KiB)")
    if tok.get_vocab_size() < args.vocab_size:
        print(f"note: the corpus supports only {tok.get_vocab_size()} of the {args.vocab_size} tokens asked for",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
