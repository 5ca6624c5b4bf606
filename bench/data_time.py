"""Per-step data time on the CPU: the whole global batch on every rank against each rank's own rows.

    python bench/data_time.py [--gbs 1024 --seq 4096 --dp 1 64 --tokens-per-prefix 32000000 --step-time 2.0]
        [--format native|megatron]

The data is the pretrain format as train.py reads it: two synthetic .bin/.idx prefixes (Qwen2's
152,064-token vocabulary: uint32 tokens in the project's format, int32 in Megatron-LM's with
--format megatron; documents of 200..8000 tokens each ending with EOD),
packed (DocumentPackedDataset) with reset_position_ids, reset_attention_mask and eod_mask_loss on,
blended 0.7 / 0.3 (BlendedDataset). For each data-parallel degree dp, as dp rank --dp-rank:

- before: the whole global batch built on the training thread (`global_batch`), 1/dp of it kept;
- after: only this rank's rows read (`local_batch`);
- exposed: the time the training thread waits in `BatchPrefetcher.get` while a simulated step
  (time.sleep(--step-time)) runs between reads; the first step waits for a whole read (nothing
  was read ahead yet), so it is reported apart from the steady state. Freeing the step before's
  batch, which the training loop does on its thread when it takes the next one (train.py's
  data_time_s holds both), is reported beside it.

Each figure is the mean and median over --steps (--prefetch-steps for the exposed wait) global
batches, steps 0, 1, 2, ... of the run; before and after take turns at each step, after one
untimed read of step 0 each, and each of their times includes freeing the batch read. A corpus
smaller than the steps need is read over several epochs (each with its own sample order), as
training does. The chunk checksums are verified once before timing, which also brings the whole
.bin into memory (bench/data_verify.py measures verification). The simulated step sleeps and so
leaves the CPU to the reader: a step whose host thread is busy (kernel launches) shares the
interpreter with it. Writes --out (default bench/results/data_time_cpu_<date>.json) with the
CPU, the commit, the date and this command.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron_qwen2.data import (BatchPrefetcher, BlendedDataset, open_indexed, write_indexed_dataset,  # noqa: E402
                                 write_megatron_dataset)
from megatron_qwen2.data.indexed import index_dtype  # noqa: E402
from megatron_qwen2.data.megatron_indexed import megatron_dtype  # noqa: E402
from megatron_qwen2.data.batch import Batch  # noqa: E402
from megatron_qwen2.data.packed import DocumentPackedDataset  # noqa: E402

VOCAB, EOD, SEED = 152064, 0, 1234  # Qwen2's vocabulary: uint32 tokens
WEIGHTS = (0.7, 0.3)


def write_prefix(prefix: Path, num_tokens: int, seed: int, index_format: str) -> None:
    """Documents of 200..8000 random tokens in [1, VOCAB), each ending with EOD, about num_tokens in all,
    in the project's format ("native") or Megatron-LM's ("megatron")."""
    rng = np.random.default_rng(seed)

    def documents():
        left = num_tokens
        while left > 0:
            n = min(left, int(rng.integers(200, 8001)))
            yield np.append(rng.integers(1, VOCAB, n - 1, dtype=np.uint32), np.uint32(EOD))
            left -= n

    if index_format == "megatron":
        write_megatron_dataset(prefix, documents(), dtype=megatron_dtype(VOCAB))
    else:
        write_indexed_dataset(prefix, documents(), vocab_size=VOCAB)


def blended_dataset(prefixes: Sequence[Path], seq: int) -> BlendedDataset:
    """The two prefixes packed with the document masks and blended, as build_datasets makes them
    (whole files, no valid split); every chunk checksum verified."""
    parts = []
    for i, prefix in enumerate(prefixes):
        data = open_indexed(prefix)
        data.verify()
        parts.append(DocumentPackedDataset(data, (0, len(data)), seq, [SEED, i, 0], EOD, VOCAB,
                                           reset_position_ids=True, reset_attention_mask=True, eod_mask_loss=True,
                                           name=str(prefix)))
    return BlendedDataset(parts, list(WEIGHTS))


def summary(times: Sequence[float]) -> dict:
    return {"steps": len(times), "mean_s": statistics.fmean(times), "median_s": statistics.median(times),
            "min_s": min(times), "max_s": max(times)}


def timed(reads: Sequence[Callable[[int], Batch]], steps: int) -> list[list[float]]:
    """Seconds of each read at steps 0 .. steps-1, the reads taking turns at each step (a shared
    machine's load then weighs on all of them alike)."""
    times: list[list[float]] = [[] for _ in reads]
    for step in range(steps):
        for read, out in zip(reads, times):
            began = time.perf_counter()
            read(step)
            out.append(time.perf_counter() - began)
    return times


def exposed_wait(dataset, gbs: int, dp_rank: int, dp: int, steps: int, step_time_s: float) -> dict:
    """Seconds the training thread waits for each batch of a BatchPrefetcher while each step sleeps,
    and the seconds it then takes to free the batch of the step before (as the training loop does
    when it takes the next batch)."""
    waits, frees = [], []
    held = None  # the batch of the step before, freed once the next one is in hand
    batches = BatchPrefetcher(dataset, gbs, dp_rank, dp, range(steps))
    for step in batches.steps_then_close():
        began = time.perf_counter()
        batch = batches.get(step)
        waits.append(time.perf_counter() - began)
        began = time.perf_counter()
        held = None
        frees.append(time.perf_counter() - began)
        held, batch = batch, None
        time.sleep(step_time_s)
    out = {"step_time_s": step_time_s, "first_step_wait_s": waits[0], "all_steps": summary(waits)}
    if len(waits) > 1:
        out["after_the_first"] = summary(waits[1:])
        out["free_previous_batch"] = summary(frees[1:])
    del held
    return out


def cpu_name() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown CPU"


def git_commit() -> str:
    """The short commit, with ' + working tree' when tracked files differ from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
        return head + (" + working tree" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gbs", type=int, default=1024, help="global batch size (samples)")
    parser.add_argument("--seq", type=int, default=4096, help="seq_length")
    parser.add_argument("--dp", type=int, nargs="+", default=[1, 64], help="data-parallel degrees")
    parser.add_argument("--dp-rank", type=int, default=0, help="the rank measured at each dp (taken modulo dp)")
    parser.add_argument("--tokens-per-prefix", type=int, default=32_000_000, help="tokens of each synthetic prefix")
    parser.add_argument("--steps", type=int, default=10, help="global batches timed for each before / after figure")
    parser.add_argument("--prefetch-steps", type=int, default=10, help="steps of the exposed-wait figure")
    parser.add_argument("--step-time", type=float, default=2.0,
                        help="seconds of the simulated step (default 2 s, the order of a Qwen2-7B step)")
    parser.add_argument("--format", default="native", choices=("native", "megatron"), dest="index_format",
                        help="the index format of the synthetic prefixes (data.paths reads both)")
    parser.add_argument("--dir", default=None, help="where the synthetic prefixes are written (default: a temp dir)")
    parser.add_argument("--out", default=None, help="result file (default bench/results/data_time_cpu_<date>.json)")
    args = parser.parse_args(argv)
    for dp in args.dp:
        if dp < 1 or args.gbs % dp:
            parser.error(f"--dp {dp}: --gbs {args.gbs} must be a multiple of every dp")

    date = datetime.date.today().isoformat()
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / (
        f"data_time_cpu_{date}.json" if args.index_format == "native" else f"data_time_{args.index_format}_cpu_{date}.json")
    command = "python " + " ".join(shlex.quote(a) for a in
                                   [os.path.relpath(__file__, ROOT)] + list(sys.argv[1:] if argv is None else argv))
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        began = time.perf_counter()
        prefixes = [Path(tmp) / name for name in ("a", "b")]
        for i, prefix in enumerate(prefixes):
            write_prefix(prefix, args.tokens_per_prefix, seed=i, index_format=args.index_format)
        write_s = time.perf_counter() - began
        dataset = blended_dataset(prefixes, args.seq)
        samples_needed = max(args.steps, args.prefetch_steps) * args.gbs
        result = {
            "what": "per-step data time on the CPU: the whole global batch vs this data-parallel rank's rows, and "
                    "the wait left with the background reader",
            "device": f"CPU: {cpu_name()}, {os.cpu_count()} cores",
            "commit": git_commit(), "date": date, "command": command,
            "load_average_at_start": list(os.getloadavg()), "torch_threads": torch.get_num_threads(),
            "config": {"global_batch_size": args.gbs, "seq_length": args.seq, "format": "pretrain",
                       "reset_position_ids": True, "reset_attention_mask": True, "eod_mask_loss": True,
                       "blend": {"weights": list(WEIGHTS), "tokens_per_prefix": args.tokens_per_prefix,
                                 "index_format": args.index_format,
                                 "token_dtype": str(megatron_dtype(VOCAB) if args.index_format == "megatron"
                                                    else index_dtype(VOCAB))},
                       "samples_per_epoch": len(dataset), "samples_read_per_figure": samples_needed,
                       "epochs_read": -(-samples_needed // len(dataset)), "corpus_write_s": write_s},
            "notes": ["before: dataset.global_batch(step, gbs) then rows [r*gbs/dp, (r+1)*gbs/dp) kept; after: "
                      "dataset.local_batch(step, gbs, r, dp); both on the calling thread",
                      "exposed: BatchPrefetcher.get(step) on the training thread while time.sleep(step_time_s) "
                      "stands in for the step; the first step waits for a whole read; free_previous_batch: "
                      "dropping the step before's batch on the training thread once the next one is in hand",
                      "before and after include freeing the batch read",
                      "the corpus is smaller than the samples read: samples are drawn across epochs, each epoch "
                      "in its own order" if samples_needed > len(dataset) else
                      "every sample read lies in the first epoch",
                      "chunk checksums verified before timing, the .bin read into memory by it (bench/data_verify.py "
                      "measures verification)",
                      "the machine may be shared: see load_average_at_start; medians are the steadier figure"],
            "before": {}, "after": {}, "exposed": {}, "after_speedup_median": {}}
        for dp in args.dp:
            rank = args.dp_rank % dp
            n = args.gbs // dp
            key = "dp1" if dp == 1 else f"dp{dp}_one_rank"
            assert torch.equal(dataset.local_batch(0, args.gbs, rank, dp).tokens,
                               dataset.global_batch(0, args.gbs).tokens[rank * n:(rank + 1) * n])
            before, after = timed([lambda step: dataset.global_batch(step, args.gbs)[rank * n:(rank + 1) * n],
                                   lambda step: dataset.local_batch(step, args.gbs, rank, dp)], args.steps)
            result["before"][key] = dict(summary(before), dp=dp, dp_rank=rank, rows_kept=n, rows_read=args.gbs)
            result["after"][key] = dict(summary(after), dp=dp, dp_rank=rank, rows_kept=n, rows_read=n)
            result["after_speedup_median"][key] = statistics.median(before) / statistics.median(after)
            result["exposed"][key] = dict(exposed_wait(dataset, args.gbs, rank, dp, args.prefetch_steps,
                                                       args.step_time), dp=dp, dp_rank=rank)
            exposed = result["exposed"][key]
            print(f"{key}: before {statistics.median(before) * 1e3:.1f} ms, after {statistics.median(after) * 1e3:.1f} "
                  f"ms per step (median of {args.steps}); with the prefetcher and a {args.step_time:g} s step the "
                  f"training thread waits {exposed['first_step_wait_s'] * 1e3:.1f} ms at the first step, then "
                  f"{exposed.get('after_the_first', exposed['all_steps'])['median_s'] * 1e3:.2f} ms (median)"
                  + (f", and frees the step before's batch in "
                     f"{exposed['free_previous_batch']['median_s'] * 1e3:.2f} ms" if "free_previous_batch" in exposed
                     else ""),
                  flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
