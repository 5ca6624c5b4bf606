"""Save and load time of a model's full training state, with and without checksums, in one run.

    python bench/checkpoint_io.py --model qwen2_1.5b --dir /tmp/ckpt_bench [--rounds 2] [--out FILE]

The state is what a training checkpoint holds: fp32 master weights and both Adam moments
(Qwen2-1.5B: 1.54e9 parameters x 12 bytes = 18.5 GB), after one real optimizer step on random
tokens, on one process. Every save and load goes through what training uses
(megatron_qwen2.checkpoint.distributed: a blocking CheckpointSaver.save, verify_checkpoint,
load_training_checkpoint). Variants, alternated within each round:

- save, hashing: the training path (xxh3 of every byte as it is written, the manifest);
- save, no hashing: the same with the hasher replaced by one that does nothing;
- load, verify: verify_checkpoint (every file read and hashed) then load_training_checkpoint;
- load, no verify: load_training_checkpoint(verify=False).

One untimed save and load come first. Also measured: xxh3_64 and zlib.crc32 throughput on
--hash-gb of random bytes (one thread), and the non-finite check run before each save. Loads
read the checkpoint just written, from the page cache when memory holds it (`--drop-caches`,
as root, drops it before each load).
Prints a table and writes JSON (device, commit, date, command) to bench/results/ or --out.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
import types
import zlib
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import xxhash  # noqa: E402

from bench.common import device_name, device_slug, write_result_file  # noqa: E402
from bench.train_throughput import model_config  # noqa: E402
from megatron_qwen2.checkpoint import distributed, native  # noqa: E402


class _NoHash:
    """Stands in for xxhash.xxh3_64 in the no-hashing save."""

    def update(self, data) -> None:
        pass

    def hexdigest(self) -> str:
        return "0" * 16


NO_HASHING = types.SimpleNamespace(xxh3_64=_NoHash, xxh3_64_hexdigest=lambda data: "0" * 16)


def hash_throughput(gb: float) -> dict:
    """GB/s of xxh3_64 and zlib.crc32 over `gb` GB of random bytes, best of 3, one thread."""
    data = torch.randint(0, 256, (int(gb * 1e9),), dtype=torch.uint8).numpy()
    view = memoryview(data)
    out = {"bytes": len(view)}
    for name, fn in (("xxh3_64", lambda: xxhash.xxh3_64(view).intdigest()), ("crc32", lambda: zlib.crc32(view))):
        times = []
        for _ in range(3):
            began = time.perf_counter()
            fn()
            times.append(time.perf_counter() - began)
        out[f"{name}_gbs"] = len(view) / min(times) / 1e9
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def drop_caches() -> bool:
    """Drop the page cache (root only); whether it worked."""
    try:
        import os

        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def build(model: str, layers: int | None, device: torch.device, seq: int):
    """A TrainingStep of the model after one optimizer step (masters and Adam moments are filled)."""
    from megatron_qwen2.config import Config, OptimConfig, ParallelConfig, TrainConfig
    from megatron_qwen2.data.batch import Batch
    from megatron_qwen2.engine.step import TrainingStep
    from megatron_qwen2.parallel import Topology

    mcfg = model_config(model, layers)
    cfg = Config(model=mcfg, parallel=ParallelConfig(), optim=OptimConfig(warmup_steps=0, schedule="constant"),
                 train=TrainConfig(seq_length=seq, micro_batch_size=1, global_batch_size=1, dtype="bf16"),
                 device=device.type)
    cfg.validate(1)
    topo = Topology.build(cfg.parallel, 1, 0)
    step = TrainingStep(cfg, topo, device, init_on_device=True)
    tokens = torch.randint(0, mcfg.vocab_size, (1, seq + 1), device=device)
    step(Batch(tokens=tokens), cfg.optim.lr)
    sync(device)
    return cfg, topo, step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="qwen2_1.5b", help="a bench/train_throughput.py preset or conf/model name")
    parser.add_argument("--layers", type=int, default=None, help="keep only this many layers")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dir", default="/tmp/checkpoint_io_bench", help="where the checkpoints are written "
                        "(emptied first; one checkpoint at a time)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of each variant")
    parser.add_argument("--seq", type=int, default=128, help="tokens of the one optimizer step that fills the state")
    parser.add_argument("--hash-gb", type=float, default=1.0, help="GB of random bytes for the hash throughput")
    parser.add_argument("--verify-threads", type=int, default=native.VERIFY_THREADS,
                        help="files each process reads and checks at a time")
    parser.add_argument("--drop-caches", action="store_true", help="drop the page cache before each load (root)")
    parser.add_argument("--out", default=None, help="JSON file (default bench/results/checkpoint_io_<model>_<device>.json)")
    parser.add_argument("--commit", default=None, help="commit measured (default $GIT_COMMIT or git rev-parse HEAD)")
    args = parser.parse_args()
    device = torch.device(args.device, torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    native.VERIFY_THREADS = args.verify_threads

    hashes = hash_throughput(args.hash_gb)
    print(f"hash throughput on {hashes['bytes'] / 1e9:.2f} GB, one thread: xxh3_64 {hashes['xxh3_64_gbs']:.2f} GB/s, "
          f"crc32 {hashes['crc32_gbs']:.2f} GB/s", flush=True)

    cfg, topo, step = build(args.model, args.layers, device, args.seq)
    chunks, optimizer = step.chunks, step.optimizer
    state_bytes = sum(t.numel() * t.element_size() for st in optimizer.state_dict()["fragments"] for t in st.values())
    print(f"model {args.model}: {state_bytes / 1e9:.2f} GB of fp32 masters and Adam moments on {device}", flush=True)

    began = time.perf_counter()
    distributed._check_finite(optimizer.state_dict(), 1)
    sync(device)
    finite_check_s = time.perf_counter() - began

    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    saver = distributed.CheckpointSaver(async_save=False)  # the training loop's saver, each save blocking
    saves: dict[str, list[float]] = {"hashing": [], "no_hashing": []}
    last = None

    def save(variant: str) -> None:
        nonlocal last
        shutil.rmtree(root, ignore_errors=True)  # one checkpoint on disk at a time
        native.xxhash = xxhash if variant == "hashing" else NO_HASHING
        try:
            sync(device)
            t0 = time.perf_counter()
            saver.save(root, 1, chunks, optimizer, topo, cfg.model, train_state={"consumed_samples": 1},
                       run_config={})
            saves[variant].append(time.perf_counter() - t0)
        finally:
            native.xxhash = xxhash
        last = variant
        print(f"save {variant}: {saves[variant][-1]:.2f} s", flush=True)

    save("hashing")  # untimed warm-up (allocator, file system)
    saves["hashing"].pop()
    for r in range(args.rounds):
        for variant in (("hashing", "no_hashing") if r % 2 else ("no_hashing", "hashing")):
            save(variant)
    if last != "hashing":
        save("hashing")  # the loads verify against real checksums
        saves["hashing"].pop()

    ckpt = root / "step_000001"
    ckpt_bytes = sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file())
    loads: dict[str, list[float]] = {"verify": [], "no_verify": []}
    verify_only: list[float] = []
    dropped = []
    distributed.load_training_checkpoint(ckpt, chunks, optimizer, topo, verify=False)  # untimed warm-up
    for r in range(args.rounds):
        for variant in (("no_verify", "verify") if r % 2 else ("verify", "no_verify")):
            if args.drop_caches:
                dropped.append(drop_caches())
            sync(device)
            t0 = time.perf_counter()
            if variant == "verify":
                distributed.verify_checkpoint(ckpt)
                verify_only.append(time.perf_counter() - t0)
            distributed.load_training_checkpoint(ckpt, chunks, optimizer, topo, verify=False)
            sync(device)
            loads[variant].append(time.perf_counter() - t0)
            print(f"load {variant}: {loads[variant][-1]:.2f} s", flush=True)

    def med(xs):
        return statistics.median(xs)

    save_overhead = med(saves["hashing"]) / med(saves["no_hashing"]) - 1
    load_overhead = med(loads["verify"]) / med(loads["no_verify"]) - 1
    print(f"\n{'':22}{'median s':>10}{'GB/s':>8}   all rounds")
    for name, xs in (("save, hashing", saves["hashing"]), ("save, no hashing", saves["no_hashing"]),
                     ("load, verify", loads["verify"]), ("load, no verify", loads["no_verify"]),
                     ("verify alone", verify_only)):
        print(f"{name:22}{med(xs):10.2f}{ckpt_bytes / med(xs) / 1e9:8.2f}   {', '.join(f'{x:.2f}' for x in xs)}")
    print(f"checkpoint {ckpt_bytes / 1e9:.2f} GB; hashing adds {save_overhead:+.1%} to a save, verification "
          f"{load_overhead:+.1%} to a load (target <= 10 %); the non-finite check took {finite_check_s:.3f} s")

    payload = {
        "benchmark": "checkpoint_io", "model": args.model, "layers": args.layers, "device_type": device.type,
        "state_bytes": state_bytes, "checkpoint_bytes": ckpt_bytes, "checkpoint_dir": str(root),
        "rounds": args.rounds, "verify_threads": args.verify_threads, "save_threads": distributed.SAVE_THREADS,
        "hash_throughput": hashes, "finite_check_s": finite_check_s,
        "save_s": saves, "load_s": loads, "verify_s": verify_only,
        "save_hashing_overhead": save_overhead, "load_verify_overhead": load_overhead,
        "page_cache_dropped_before_loads": all(dropped) if dropped else False,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    out = args.out or ROOT / "bench" / "results" / f"checkpoint_io_{args.model}_{device_slug(device_name())}.json"
    path = write_result_file(out, payload, args.commit)
    print(f"wrote {path}")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
