"""A real training run on one GPU: preprocess -> train -> SIGTERM mid-run -> resume -> finish.

    python bench/train_run.py --out DIR [--steps 300] [--stop-at 150] [train overrides ...]

Tokenises a corpus with tools/preprocess_data.py (default: this Python's standard library
source, the repository's tokenizer), trains `python -m megatron_qwen2.train` on the indexed
files, sends SIGTERM once step --stop-at has been logged (the run saves a checkpoint at the next
step boundary and exits 75), starts the same command again (it resumes from `latest`) and lets
it finish. Writes the console logs, metrics.jsonl and a JSON summary (loss curve, tokens/s,
MFU, memory, checkpoint save / resume times, the bf16 matmul ceiling measured in the same run).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import SPEC_PEAK_TFLOPS, matmul_ceiling_tflops, write_result  # noqa: E402

DEFAULT_TRAIN = ["model=qwen2_1.5b", "device=cuda", "train.dtype=bf16", "train.seq_length=1024",
                 "train.micro_batch_size=4", "train.global_batch_size=16", "optim.lr=3e-4", "optim.warmup_steps=30",
                 "train.log_interval=10", "train.eval_interval=100", "train.eval_iters=2", "train.keep_last=1",
                 "data.split=[98,2]"]


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--work", type=Path, default=Path("/tmp/train_run"))
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--stop-at", type=int, default=150)
    ap.add_argument("--input", default=str(Path(sysconfig.get_paths()["stdlib"]) / "**" / "*.py"))
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--max-wall", type=float, default=480.0,
                    help="seconds after which the resumed run is stopped with SIGTERM (it saves and exits 75)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    prefix = args.work / "data" / "corpus"

    t0 = time.perf_counter()
    pre = subprocess.run([sys.executable, "tools/preprocess_data.py", "--input", args.input, "--output-prefix",
                          str(prefix), "--workers", str(args.workers)], cwd=ROOT, capture_output=True, text=True)
    (args.out / "preprocess.log").write_text(pre.stdout + pre.stderr)
    if pre.returncode != 0:
        print(pre.stdout + pre.stderr)
        return 1
    preprocess_s = time.perf_counter() - t0

    run_dir = args.work / "run"
    cmd = [sys.executable, "-m", "megatron_qwen2.train", *DEFAULT_TRAIN, f"data.paths=[{prefix}]",
           f"train.steps={args.steps}", *args.overrides, f"hydra.run.dir={run_dir}"]
    phases = []
    for phase in ("first", "resumed"):
        log = open(args.out / f"train_{phase}.log", "w")
        began = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        signalled = None
        while proc.poll() is None:
            if signalled is None and ((phase == "first" and len(read_metrics(run_dir)) >= args.stop_at)
                                      or time.perf_counter() - t0 > args.max_wall):
                proc.send_signal(signal.SIGTERM)
                signalled = len(read_metrics(run_dir))
            time.sleep(0.2)
        log.close()
        phases.append({"phase": phase, "exit_code": proc.returncode, "wall_s": time.perf_counter() - began,
                       "sigterm_after_step": signalled})
        print(phases[-1], flush=True)
        if proc.returncode not in (0, 75):
            print((args.out / f"train_{phase}.log").read_text()[-5000:])
            break

    rows = read_metrics(run_dir)
    shutil.copy(run_dir / "metrics.jsonl", args.out / "metrics.jsonl")
    text = "".join((args.out / f"train_{p}.log").read_text() for p in ("first", "resumed")
                   if (args.out / f"train_{p}.log").exists())
    save_wait_s = [float(x) for x in re.findall(r"checkpoint step_\d+; the loop waited ([\d.]+)s", text)]
    save_total_s = [float(x) for x in re.findall(r"checkpoint step_\d+ complete after ([\d.]+)s", text)]
    resume = re.findall(r"resumed from (\S+) at step (\d+) .* in ([\d.]+)s", text)
    by_step = {r["step"]: r for r in rows}
    resume_step = int(resume[0][1]) if resume else None
    # Steady-state throughput: skip the first steps of each process (allocator warm-up) and eval steps.
    after_resume = range(resume_step + 1, resume_step + 4) if resume_step is not None else range(0)
    steady = [r for r in rows if r["step"] > 5 and r["step"] not in after_resume and "val_loss" not in r]
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    marks = sorted({1, 10, 25, 50, 100, 150, 200, 250, args.steps} & set(by_step))
    import torch

    ceiling = matmul_ceiling_tflops() if torch.cuda.is_available() else None
    payload = {
        "what": "Qwen2-1.5B training on one GPU: preprocess -> train -> SIGTERM -> resume -> finish",
        "command": " ".join(cmd[1:]),
        "corpus": args.input, "preprocess_s": round(preprocess_s, 1),
        "preprocess_summary": pre.stdout.strip().splitlines()[-1:] + pre.stderr.strip().splitlines()[-1:],
        "phases": phases,
        "steps_logged": len(rows), "steps_unique": len(by_step),
        "loss_at_step": {s: round(by_step[s]["loss"], 4) for s in marks},
        "loss_first10_mean": mean([r["loss"] for r in rows[:10]]),
        "loss_last10_mean": mean([r["loss"] for r in rows[-10:]]),
        "val_loss": {r["step"]: round(r["val_loss"], 4) for r in rows if "val_loss" in r},
        "skipped_steps": sum(1 for r in rows if r.get("skipped")),
        "tokens_per_s_mean": mean([r["tokens_per_s"] for r in steady]),
        "step_time_s_mean": mean([r["step_time_s"] for r in steady]),
        "mfu_mean": mean([r["mfu"] for r in steady if "mfu" in r]),
        "tflops_per_device_mean": mean([r["tflops_per_device"] for r in steady if "tflops_per_device" in r]),
        "mfu_denominator_tflops": SPEC_PEAK_TFLOPS,
        "matmul_ceiling_tflops": ceiling,
        "mem_peak_gib": max((r.get("mem_peak_gib", 0) for r in rows), default=None),
        "checkpoint_loop_wait_s": save_wait_s,
        "checkpoint_save_total_s": save_total_s,
        "resume": [{"from": f, "step": int(s), "load_s": float(t)} for f, s, t in resume],
        "loss_around_resume": {s: round(by_step[s]["loss"], 4) for s in range((resume_step or 0) - 2,
                                                                               (resume_step or 0) + 3) if s in by_step},
    }
    if torch.cuda.is_available():
        path = write_result("train_qwen2_1.5b", payload, str(args.out))
    else:  # a dry run of the driver on a CPU
        path = args.out / "train_cpu.json"
        path.write_text(json.dumps(payload, indent=1) + "\n")
    print(json.dumps(payload, indent=1))
    print(f"wrote {path}")
    return 0 if all(p["exit_code"] in (0, 75) for p in phases) else 1


if __name__ == "__main__":
    sys.exit(main())
