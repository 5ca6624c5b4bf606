"""Step metrics to the console, to run_dir/metrics.jsonl (appended across runs) and to wandb.

metrics.jsonl keeps flat keys (step, loss, lr, grad_norm, tokens_per_s, mfu, ...), one object per
step. wandb gets the same values under grouped names (`WANDB_GROUPS`: train/, perf/, mem/, moe/,
data/) so the dashboards sort themselves; it runs offline unless WANDB_API_KEY is set or
`wandb.mode=online`, and is optional: without the package the other two outputs still work.
Every start in a run dir (a requeued job, a resume) continues the same wandb run: its id is kept
in RUN_DIR/wandb_run_id and wandb.init resumes it.
Only one process (global rank 0) constructs a logger.

MFU = model FLOPs per token (model/flops.py: forward + backward matmuls, causal attention, no
recomputation counted) x tokens/s / (peak FLOP/s per device x devices).
"""

from __future__ import annotations

import json
import os
import resource
import secrets
import sys
from pathlib import Path
from typing import Any, Optional

import torch

from megatron_qwen2.config import WandbConfig

# Dense bf16 tensor-core peaks (TFLOP/s per device) by substring of the device name.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "GH200": 989.0, "A100": 312.0, "L40S": 362.0, "B200": 2250.0}

WANDB_RUN_ID_FILE = "wandb_run_id"  # in the run dir: the wandb run every start there continues

WANDB_GROUPS = {
    "loss": "train/loss", "val_loss": "train/val_loss", "lr": "train/lr", "grad_norm": "train/grad_norm",
    "aux_loss": "moe/aux_loss", "skipped": "train/skipped_steps",
    "tokens_per_s": "perf/tokens_per_s", "step_time_s": "perf/step_time_s", "mfu": "perf/mfu",
    "data_time_s": "perf/data_time_s",
    "tflops_per_device": "perf/tflops_per_device",
    "mem_allocated_gib": "mem/allocated_gib", "mem_peak_gib": "mem/peak_gib", "mem_rss_gib": "mem/host_rss_gib",
    "consumed_samples": "data/consumed_samples", "consumed_tokens": "data/consumed_tokens",
}


def wandb_name(key: str) -> str:
    """The grouped wandb name of a metrics.jsonl key (moe_* -> moe/*, dpo_* -> dpo/*, anything else -> train/*)."""
    if key in WANDB_GROUPS:
        return WANDB_GROUPS[key]
    if key.startswith("moe_"):
        return "moe/" + key[4:]
    if key.startswith("dpo_"):
        return "dpo/" + key[4:]
    return "train/" + key


def wandb_run_id(run_dir: Path) -> str:
    """The wandb run id of a run directory, kept in RUN_DIR/wandb_run_id so that every start there
    (a requeued job, a resume) continues the same wandb run. WANDB_RUN_ID, when set, wins; a run
    dir without the file gets WANDB_RUN_ID or a new random id, written there."""
    path = Path(run_dir) / WANDB_RUN_ID_FILE
    given = os.environ.get("WANDB_RUN_ID")
    try:
        kept = path.read_text().strip()
    except OSError:
        kept = ""
    run_id = given or kept or secrets.token_hex(4)
    if run_id != kept:
        tmp = path.with_name(f".{WANDB_RUN_ID_FILE}.{os.getpid()}.tmp")
        tmp.write_text(run_id + "\n")
        os.replace(tmp, path)
    return run_id


def peak_flops_per_device(device: torch.device, override_tflops: Optional[float] = None) -> Optional[float]:
    """Peak FLOP/s of one device for MFU: the override, a known GPU's bf16 dense peak, or None."""
    if override_tflops is not None:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None


def memory_metrics(device: torch.device) -> dict[str, float]:
    """Device memory (allocated now, peak since start) in GiB on CUDA; the host's peak RSS elsewhere."""
    if device.type == "cuda":
        return {"mem_allocated_gib": torch.cuda.memory_allocated(device) / 2**30,
                "mem_peak_gib": torch.cuda.max_memory_allocated(device) / 2**30}
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"mem_rss_gib": rss_kib / 2**20}


class MetricsLogger:
    """One JSON object per step; only the rank that owns logging (rank 0) constructs one."""

    CONSOLE = (("loss", "loss {:.4f}"), ("val_loss", "val {:.4f}"), ("dpo_margin", "margin {:.3f}"),
               ("dpo_accuracy", "acc {:.2f}"), ("lr", "lr {:.3e}"),
               ("grad_norm", "gnorm {:.3f}"), ("aux_loss", "aux {:.4f}"), ("tokens_per_s", "{:,.0f} tok/s"),
               ("data_time_s", "data {:.3f}s"),
               ("mfu", "mfu {:.1%}"), ("mem_peak_gib", "mem {:.1f} GiB"), ("mem_rss_gib", "rss {:.2f} GiB"),
               ("moe_max_over_mean", "expert load max/mean {:.2f}"))

    def __init__(self, run_dir: Path, wandb_cfg: WandbConfig, config: dict, enabled: bool = True,
                 log_interval: int = 1, total_steps: Optional[int] = None):
        self.enabled = enabled
        self.log_interval = log_interval
        self.total_steps = total_steps
        if enabled:
            Path(run_dir).mkdir(parents=True, exist_ok=True)
        self.file = open(Path(run_dir) / "metrics.jsonl", "a", encoding="utf-8") if enabled else None
        self.wandb = None
        if enabled and wandb_cfg.enabled:
            try:
                import wandb
            except ImportError:
                print("warning: wandb.enabled=true but the wandb package is not installed; logging to "
                      "the console and metrics.jsonl only", file=sys.stderr, flush=True)
            else:
                mode = wandb_cfg.mode or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
                self.wandb = wandb.init(project=wandb_cfg.project, dir=str(run_dir), config=config, mode=mode,
                                        resume="allow", id=wandb_run_id(run_dir))

    def log(self, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(metrics) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log(self.wandb_payload(metrics), step=metrics["step"])
        step = metrics["step"]
        if step % self.log_interval == 0 or step == 1 or step == self.total_steps or "val_loss" in metrics:
            print(self.console_line(metrics), file=sys.stdout, flush=True)

    def wandb_payload(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """Grouped names; nested dicts (per-layer MoE load) flattened to moe/layer_L/field, lists as histograms."""
        out: dict[str, Any] = {}

        def put(name: str, value: Any) -> None:
            if isinstance(value, dict):
                for k, v in value.items():
                    put(f"{name}/layer_{k}" if name == "moe/load" else f"{name}/{k}", v)
            elif isinstance(value, (list, tuple)):
                out[name] = self._histogram(value)
            else:
                out[name] = value

        for key, value in metrics.items():
            if key != "step":
                put(wandb_name(key), value)
        return out

    @staticmethod
    def _histogram(values):
        import wandb

        return wandb.Histogram(values)

    def console_line(self, metrics: dict[str, Any]) -> str:
        total = f"/{self.total_steps}" if self.total_steps else ""
        parts = [f"step {metrics['step']}{total}"]
        for key, fmt in self.CONSOLE:
            v = metrics.get(key)
            if v is not None:
                parts.append(fmt.format(v))
        if metrics.get("skipped"):
            parts.append("SKIPPED (non-finite)")
        return " | ".join(parts)

    def message(self, text: str) -> None:
        print(text, file=sys.stdout, flush=True)

    def close(self, summary: Optional[dict] = None) -> None:
        if self.file is not None:
            self.file.close()
        if self.wandb is not None:
            if summary:
                self.wandb.summary.update({wandb_name(k): v for k, v in summary.items() if k != "step"})
            self.wandb.finish()
