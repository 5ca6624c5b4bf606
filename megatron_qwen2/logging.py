"""Step metrics to the console, to run_dir/metrics.jsonl (appended across runs) and to wandb."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Optional

from megatron_qwen2.config import WandbConfig


class MetricsLogger:
    """One JSON object per step; only the rank that owns logging (rank 0) writes anything."""

    def __init__(self, run_dir: Path, wandb_cfg: WandbConfig, config: dict, enabled: bool = True,
                 log_interval: int = 1):
        self.enabled = enabled
        self.log_interval = log_interval
        self.file = open(run_dir / "metrics.jsonl", "a", encoding="utf-8") if enabled else None
        self.wandb = None
        if enabled and wandb_cfg.enabled:
            import wandb

            mode = wandb_cfg.mode or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
            self.wandb = wandb.init(project=wandb_cfg.project, dir=str(run_dir), config=config, mode=mode,
                                    resume="allow", id=os.environ.get("WANDB_RUN_ID"))

    def log(self, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(metrics) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in metrics.items() if k != "step"}, step=metrics["step"])
        if metrics["step"] % self.log_interval == 0 or metrics["step"] == 1:
            parts = [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()]
            print(" | ".join(parts), file=sys.stdout, flush=True)

    def close(self, summary: Optional[dict] = None) -> None:
        if self.file is not None:
            self.file.close()
        if self.wandb is not None:
            if summary:
                self.wandb.summary.update(summary)
            self.wandb.finish()
