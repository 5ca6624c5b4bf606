"""What verifying the .bin chunk checksums costs, on the CPU, against the 7B training step.

    python bench/data_verify.py [--gbs 1024 --seq 4096 --batches 8 --chunk-bytes 16384 65536 262144]

1. CRC-32 throughput (zlib.crc32, GB/s) over buffers of each chunk size.
2. For each chunk size: a synthetic uint32 dataset (Qwen2's 152,064-token vocabulary) of
   `batches` global batches of gbs x (seq + 1) tokens, read through the training path
   (DocumentPackedDataset -> IndexedDataset.windows). The verification cost of a batch is its
   read time with its chunks unverified minus the same read once they are verified. The first
   batch of a run is the worst case (every chunk it touches is new); the epoch mean is the cost
   of verifying the whole file once, spread over the epoch's batches. The same for the 7B step's
   own batch (bench/results/train_throughput_qwen2_7b_h200.json: gbs 8 x 4096).
3. The 7B step time: that file records a 4-layer slice of Qwen2-7B on one H200; it is scaled by
   layers (x 28/4) to the full model, and a global batch of gbs x seq tokens is spread over G GPUs
   at the scaled per-GPU rate. The result gives the overhead per step and the GPU count at which
   the worst case and the epoch mean reach 1 % of the step; and the project's own 7B recipe
   (conf/experiment/7b.yaml: global batch 256 x 4096 on one node of 8 GPUs).

Each time is the best of --reps runs (the machine may be shared). Writes
bench/results/data_verify_cpu_<date>.json (machine, commit, date, the command). The file
is read from the page cache: the I/O of a cold read is the training read's own cost, except that
a chunk is read whole (at most one chunk more per sample than the sample's own bytes).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron_qwen2.data.indexed import CHUNK_BYTES, IndexedDataset, IndexedDatasetWriter  # noqa: E402
from megatron_qwen2.data.packed import DocumentPackedDataset  # noqa: E402

VOCAB = 152064  # Qwen2-7B: uint32 tokens
FULL_LAYERS = 28
RECIPE_GPUS, RECIPE_GBS = 8, 256  # conf/experiment/7b.yaml on slurm/7b.sh's one node
STEP_RESULT = ROOT / "bench" / "results" / "train_throughput_qwen2_7b_h200.json"


def best_s(fn, reps: int) -> float:
    """The fastest of `reps` runs of fn(): the least disturbed by other work on a shared machine."""
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def crc_throughput_gbs(chunk_bytes: int, total: int = 1 << 28, reps: int = 5) -> float:
    buf = memoryview(np.random.default_rng(0).integers(0, 256, total, dtype=np.uint8).tobytes())

    def run():
        for at in range(0, total, chunk_bytes):
            zlib.crc32(buf[at:at + chunk_bytes])

    return total / best_s(run, reps) / 1e9


def write_dataset(prefix: Path, num_tokens: int, chunk_bytes: int) -> None:
    """Documents of 200..8000 random tokens, num_tokens in all."""
    rng = np.random.default_rng(1)
    with IndexedDatasetWriter(prefix, np.uint32, chunk_bytes) as writer:
        left = num_tokens
        while left:
            n = min(left, int(rng.integers(200, 8000)))
            writer.add_document(rng.integers(0, VOCAB, n, dtype=np.uint32))
            left -= n


def verification_costs(prefix: Path, gbs: int, seq: int, reps: int) -> dict:
    """Seconds spent verifying chunks per global batch: the first batch of a run (best of `reps` fresh
    readers) and the mean over one epoch; the read of a batch whose chunks are verified, for scale."""

    def dataset() -> DocumentPackedDataset:
        data = IndexedDataset(prefix)
        return DocumentPackedDataset(data, (0, len(data)), seq, 1234, eod=0, vocab_size=VOCAB)

    def verify_batches(ds, steps) -> list[float]:
        times = []
        for step in steps:
            starts = ds.window_starts(np.arange(step * gbs, (step + 1) * gbs))
            began = time.perf_counter()
            ds.data.verify_tokens(starts, starts + seq + 1)  # what windows() checks before gathering
            times.append(time.perf_counter() - began)
        return times

    warm = dataset()
    warm.data.verify()
    batches = len(warm) // gbs
    out = {"first_batch_verify_s": min(verify_batches(dataset(), [0])[0] for _ in range(reps)),
           "batch_read_verified_s": best_s(lambda: warm.global_batch(0, gbs), reps)}
    if 0 < batches <= 64:  # the whole epoch, batch by batch
        epoch = min(sum(verify_batches(dataset(), range(batches))) for _ in range(reps))
        out.update(epoch_batches=batches, epoch_mean_verify_s=epoch / batches)
    return out


def step_time_7b() -> dict:
    rec = json.loads(STEP_RESULT.read_text())
    ours = next(r for r in rec["results"] if r["system"] == "megatron_qwen2")
    layers = rec["model_config"]["num_layers"]
    step = ours["step_time_s_median"] * FULL_LAYERS / layers
    tokens = rec["config"]["tokens_per_step"]
    return {"source": str(STEP_RESULT.relative_to(ROOT)), "measured_layers": layers,
            "measured_step_s": ours["step_time_s_median"], "measured_tokens_per_step": tokens,
            "scaling": f"by layers, x {FULL_LAYERS}/{layers} (embedding and head scaled with them)",
            "full_model_step_s_one_gpu": step, "full_model_tokens_per_s_per_gpu": tokens / step}


def machine() -> dict:
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "numpy": np.__version__, "zlib": zlib.ZLIB_RUNTIME_VERSION, "platform": platform.platform()}


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
        return out.stdout.strip() + (" + uncommitted changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gbs", type=int, default=1024, help="global batch (samples)")
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--batches", type=int, default=8, help="global batches in the synthetic epoch")
    parser.add_argument("--chunk-bytes", type=int, nargs="+", default=[1 << 12, 1 << 14, 1 << 16, 1 << 18])
    parser.add_argument("--reps", type=int, default=9, help="each time is the best of this many runs")
    parser.add_argument("--gpus", type=int, nargs="+", default=[8, 64, 128, 256, 512, 1024])
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--dir", default=None, help="where the synthetic dataset is written (default: a temp dir)")
    args = parser.parse_args()

    step = step_time_7b()
    per_gpu = step["full_model_tokens_per_s_per_gpu"]
    step_batch = step["measured_tokens_per_step"] // args.seq  # the 7B step's own batch, in samples
    recipe_step_s = RECIPE_GBS * args.seq / (RECIPE_GPUS * per_gpu)
    result = {"what": "CRC-32 chunk verification of the .bin on the CPU vs the Qwen2-7B step",
              "command": "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, ROOT)] + sys.argv[1:]),
              "machine": machine(), "commit": git_commit(), "date": datetime.date.today().isoformat(),
              "default_chunk_bytes": CHUNK_BYTES, "global_batch": [args.gbs, args.seq], "step_7b": step,
              "notes": ["each time is the best of --reps runs; the machine may be shared with other work",
                        "the .bin is read from the page cache",
                        "every rank verifies the chunks it reads, all ranks at once: the cost per step is one "
                        "rank's, on one CPU core",
                        "first_batch_verify_s: no chunk checked yet, the cost of every batch early in an epoch "
                        "over a large corpus; epoch_mean_verify_s: the whole file checked once, over the epoch's "
                        "batches"],
              "crc32_gbs": {}, "chunks": {}}
    print(f"7B step: {step['measured_step_s']:.3f} s for {step['measured_tokens_per_step']} tokens on one GPU with "
          f"{step['measured_layers']} layers -> {step['full_model_step_s_one_gpu']:.2f} s with {FULL_LAYERS} "
          f"({per_gpu:,.0f} tokens/s per GPU)")
    for c in args.chunk_bytes:
        result["crc32_gbs"][str(c)] = gbs = crc_throughput_gbs(c)
        print(f"zlib.crc32 over {c:>7}-byte buffers: {gbs:.2f} GB/s")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for c in args.chunk_bytes:
            prefix = Path(tmp) / f"d{c}"
            write_dataset(prefix, args.batches * args.gbs * args.seq + 1, c)
            big = verification_costs(prefix, args.gbs, args.seq, args.reps)
            small = verification_costs(prefix, step_batch, args.seq, args.reps)
            recipe = verification_costs(prefix, RECIPE_GBS, args.seq, args.reps)
            os.unlink(f"{prefix}.bin")
            step_s = {g: args.gbs * args.seq / (g * per_gpu) for g in args.gpus}
            row = {"file_bytes": (args.batches * args.gbs * args.seq + 1) * 4,
                   "idx_checksum_bytes_per_tb": 4 * 10**12 // c,
                   f"batch_{args.gbs}x{args.seq}": big,
                   f"batch_{step_batch}x{args.seq}_the_measured_7b_step": dict(
                       small, first_batch_fraction_of_4_layer_step=small["first_batch_verify_s"] /
                       step["measured_step_s"], first_batch_fraction_of_full_step=small["first_batch_verify_s"] /
                       step["full_model_step_s_one_gpu"]),
                   "recipe_7b": dict(recipe, gpus=RECIPE_GPUS, global_batch=RECIPE_GBS, step_s=recipe_step_s,
                                     first_batch_fraction=recipe["first_batch_verify_s"] / recipe_step_s),
                   "per_gpu_count": {str(g): {"step_s": s, "first_batch_fraction": big["first_batch_verify_s"] / s,
                                             "epoch_mean_fraction": big["epoch_mean_verify_s"] / s}
                                     for g, s in step_s.items()},
                   "gpus_at_1pct_first_batch": args.gbs * args.seq / (100 * big["first_batch_verify_s"] * per_gpu)
                   if big["first_batch_verify_s"] > 0 else None,
                   "gpus_at_1pct_epoch_mean": args.gbs * args.seq / (100 * big["epoch_mean_verify_s"] * per_gpu)
                   if big["epoch_mean_verify_s"] > 0 else None}
            result["chunks"][str(c)] = row
            print(f"chunk {c:>7} B: batch {args.gbs}x{args.seq}: read {big['batch_read_verified_s'] * 1e3:.1f} ms"
                  f", verify first batch {big['first_batch_verify_s'] * 1e3:.1f} ms, epoch mean "
                  f"{big['epoch_mean_verify_s'] * 1e3:.1f} ms; 7B step batch {step_batch}x{args.seq}: first "
                  f"{small['first_batch_verify_s'] * 1e3:.2f} ms = "
                  f"{small['first_batch_verify_s'] / step['measured_step_s']:.2%} of the 4-layer step")
            print(f"    conf/experiment/7b.yaml ({RECIPE_GPUS} GPUs, gbs {RECIPE_GBS}): step {recipe_step_s:.2f} s, "
                  f"first batch {recipe['first_batch_verify_s'] * 1e3:.1f} ms = "
                  f"{recipe['first_batch_verify_s'] / recipe_step_s:.3%}")
            for g, s in step_s.items():
                print(f"    {g:>5} GPUs: 7B step {s:6.2f} s; first batch {big['first_batch_verify_s'] / s:.3%}, "
                      f"epoch mean {big['epoch_mean_verify_s'] / s:.3%}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"data_verify_cpu_{result['date']}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
