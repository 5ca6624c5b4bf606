"""Where a profiled training step's time goes: a table of time per op class, and the top kernels.

`summarise_trace(trace, wall_ms, steps)` reads a torch.profiler Chrome trace (the JSON that
`prof.export_chrome_trace` writes). On a GPU it counts device kernels, copies and sets; on a
CPU-only profile it counts the self time of the operators. Each entry is put in a class by the
phase it ran in (the `record_function` ranges the step opens: "optimizer" puts everything in it
under optimizer) and otherwise by its name. Idle is wall time minus the time the device was busy
(the union of its kernel intervals, so overlapping streams are not counted twice). On a GPU it also
ranks the host's time (operator self time and CUDA runtime calls, synchronisations among them), for
steps the host cannot keep the device busy in.
"""

from __future__ import annotations

import json
import re
import tempfile
import time
from collections import defaultdict
from pathlib import Path

CLASSES = ("GEMM", "attention", "norm/activation/elementwise", "cross-entropy/softmax", "communication",
           "optimizer", "memcpy/other", "idle")

# Phases the step marks with record_function whose whole content belongs to one class.
PHASE_CLASSES = {"optimizer": "optimizer"}

# Checked in order: the first class whose pattern matches the (lower-cased) name wins.
_PATTERNS = [
    # NCCL's broadcast kernels carry "nccl"; a bare "broadcast" is in GEMM epilogue names (scale vectors).
    ("communication", r"nccl|all_?reduce|reduce_?scatter|all_?gather|alltoall|all_to_all|c10d|sendrecv"),
    ("optimizer", r"adam|_fused_adamw|fused_adam"),
    ("attention", r"flash|fmha|sdpa|scaled_dot_product|attention|attn|cudnn.*(fprop|bprop|native)"),
    ("cross-entropy/softmax", r"cross_?entropy|softmax|nll_loss|xent|logsumexp|\bce_(fwd|bwd)"),
    ("GEMM", r"gemm|nvjet|cutlass|xmma|cublas|wgmma|sm90_|sm80_|ampere_|hopper_|aten::(mm|addmm|bmm|matmul|linear|"
             r"_grouped_mm)$|grouped_mm|splitk"),
    ("memcpy/other", r"memcpy|memset|copy_kernel|aten::(copy_|to|_to_copy|clone|contiguous|cat|empty|zero_|fill_)$|"
                     r"cat_?array|catarray|index|gather|scatter|embedding|permute|expert_(rows|count)"),
    ("norm/activation/elementwise", r"norm|rms|silu|swiglu|gelu|rope|rotary|elementwise|vectorized|unrolled|"
                                    r"reduce|pointwise|triton|aten::"),
]
_COMPILED = [(cls, re.compile(pat)) for cls, pat in _PATTERNS]


def classify(name: str) -> str:
    """The op class of a kernel or operator name (phases aside)."""
    low = name.lower()
    for cls, pat in _COMPILED:
        if pat.search(low):
            return cls
    return "memcpy/other"


def _load(trace) -> list[dict]:
    if isinstance(trace, (str, Path)):
        trace = json.loads(Path(trace).read_text())
    return trace.get("traceEvents", trace) if isinstance(trace, dict) else trace


def _union_ms(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if e <= end:
            continue
        total += e - max(s, end)
        end = e
    return total / 1000.0  # trace times are microseconds


def _self_times(events: list[dict]) -> list[tuple[dict, float]]:
    """CPU operators with their self time (duration less that of the operators nested in them, per thread)."""
    by_thread = defaultdict(list)
    for e in events:
        by_thread[(e.get("pid"), e.get("tid"))].append(e)
    out = []
    for evs in by_thread.values():
        evs.sort(key=lambda e: (e["ts"], -e["dur"]))
        stack: list[list] = []  # [event, end, child time]
        for e in evs:
            end = e["ts"] + e["dur"]
            while stack and e["ts"] >= stack[-1][1]:
                done = stack.pop()
                out.append((done[0], done[0]["dur"] - done[2]))
            if stack:
                stack[-1][2] += e["dur"]
            stack.append([e, end, 0.0])
        out.extend((d[0], d[0]["dur"] - d[2]) for d in stack)
    return out


def _phase_of(ts: float, ranges: list[tuple[float, float, str]]) -> str | None:
    for s, e, cls in ranges:
        if s <= ts < e:
            return cls
    return None


def profile_steps(step, device, steps: int = 2) -> dict:
    """torch.profiler over `steps` calls of step() on `device` (a torch.device): `summarise_trace`'s
    class table and top kernels."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    on_gpu = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    if on_gpu:
        torch.cuda.synchronize(device)
    with profile(activities=activities) as prof:
        began = time.perf_counter()
        for _ in range(steps):
            step()
        if on_gpu:
            torch.cuda.synchronize(device)
        wall_ms = (time.perf_counter() - began) * 1000.0
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        return summarise_trace(trace, wall_ms, steps)


def summarise_trace(trace, wall_ms: float, steps: int, top: int = 15) -> dict:
    """{"device_busy": bool, "per_step_ms", "classes": [{class, ms_per_step, percent}], "top_kernels": [...]}.

    `wall_ms` is the wall time of the `steps` profiled steps; percents are of it.
    """
    events = [e for e in _load(trace) if e.get("ph") == "X" and "dur" in e]
    device = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    on_device = bool(device)
    # Phase ranges: on the device timeline when the profiler recorded them there, else the CPU's.
    phase_cat = "gpu_user_annotation" if on_device else "user_annotation"
    ranges = [(e["ts"], e["ts"] + e["dur"], PHASE_CLASSES[e["name"]]) for e in events
              if e.get("cat") == phase_cat and e.get("name") in PHASE_CLASSES]
    if on_device and not ranges:  # no device-side annotation: the CPU range is the best there is
        ranges = [(e["ts"], e["ts"] + e["dur"], PHASE_CLASSES[e["name"]]) for e in events
                  if e.get("cat") == "user_annotation" and e.get("name") in PHASE_CLASSES]
    if on_device:
        timed = [(e, float(e["dur"])) for e in device]
        busy_ms = _union_ms([(e["ts"], e["ts"] + e["dur"]) for e in device])
    else:
        timed = _self_times([e for e in events if e.get("cat") == "cpu_op"])
        busy_ms = sum(t for _, t in timed) / 1000.0
    per_class = defaultdict(float)
    per_name: dict[str, list] = defaultdict(lambda: [0.0, 0, defaultdict(float)])
    for e, t in timed:
        cls = _phase_of(e["ts"], ranges) or classify(e["name"])
        per_class[cls] += t / 1000.0
        row = per_name[e["name"]]
        row[0] += t / 1000.0
        row[1] += 1
        row[2][cls] += t
    per_class["idle"] = max(wall_ms - busy_ms, 0.0)
    steps = max(steps, 1)
    classes = [{"class": c, "ms_per_step": per_class.get(c, 0.0) / steps,
                "percent": 100.0 * per_class.get(c, 0.0) / wall_ms if wall_ms > 0 else 0.0} for c in CLASSES]
    ranked = sorted(per_name.items(), key=lambda kv: -kv[1][0])[:top]
    top_kernels = [{"name": n[:160], "class": max(v[2], key=v[2].get), "ms_per_step": v[0] / steps,
                    "calls_per_step": v[1] / steps,
                    "percent": 100.0 * v[0] / wall_ms if wall_ms > 0 else 0.0} for n, v in ranked]
    return {"device_busy": on_device, "steps": steps, "wall_ms_per_step": wall_ms / steps,
            "busy_ms_per_step": busy_ms / steps, "classes": classes, "top_kernels": top_kernels,
            "top_host": _top_host(events, steps, top) if on_device else [],
            "phases": _phases(events, device, steps)}


def _top_host(events: list[dict], steps: int, top: int) -> list[dict]:
    """Where the host's time goes on a GPU profile: the operators' self time and the CUDA runtime
    calls (launches, and the synchronisations that make the host wait for the device), by name."""
    host = _self_times([e for e in events if e.get("cat") in ("cpu_op", "cuda_runtime", "cuda_driver")])
    per_name: dict[str, list] = defaultdict(lambda: [0.0, 0])
    for e, t in host:
        per_name[e["name"]][0] += t / 1000.0
        per_name[e["name"]][1] += 1
    ranked = sorted(per_name.items(), key=lambda kv: -kv[1][0])[:top]
    return [{"name": n[:160], "ms_per_step": v[0] / steps, "calls_per_step": v[1] / steps} for n, v in ranked]


def _phases(events: list[dict], device: list[dict], steps: int) -> list[dict]:
    """Per phase of the step (the record_function ranges): host time, and where the profiler put the
    range on the device timeline too, its span there and the kernel time inside it (span - busy = idle)."""
    names = sorted({e["name"] for e in events if e.get("cat") in ("user_annotation", "gpu_user_annotation")
                    and not e["name"].startswith("ProfilerStep")})
    rows = []
    for name in names:
        cpu = sum(e["dur"] for e in events if e.get("cat") == "user_annotation" and e["name"] == name)
        spans = [(e["ts"], e["ts"] + e["dur"]) for e in events
                 if e.get("cat") == "gpu_user_annotation" and e["name"] == name]
        row = {"phase": name, "host_ms_per_step": cpu / 1000.0 / steps}
        if spans:
            inside = [(max(k["ts"], s), min(k["ts"] + k["dur"], e)) for k in device for s, e in spans
                      if k["ts"] < e and k["ts"] + k["dur"] > s]
            row["device_span_ms_per_step"] = sum(e - s for s, e in spans) / 1000.0 / steps
            row["device_busy_ms_per_step"] = _union_ms(inside) / steps
        rows.append(row)
    return rows


def format_summary(summary: dict) -> str:
    """The class table and the top kernels as printable text."""
    what = "GPU kernels" if summary["device_busy"] else "CPU operator self time"
    lines = [f"profile ({what}), per step: wall {summary['wall_ms_per_step']:.1f} ms, "
             f"busy {summary['busy_ms_per_step']:.1f} ms",
             f"{'class':<30} {'ms/step':>10} {'% of step':>10}"]
    for row in summary["classes"]:
        lines.append(f"{row['class']:<30} {row['ms_per_step']:>10.2f} {row['percent']:>9.1f}%")
    for ph in summary.get("phases", []):
        dev = (f", device span {ph['device_span_ms_per_step']:.1f} ms, busy {ph['device_busy_ms_per_step']:.1f} ms"
               if "device_span_ms_per_step" in ph else "")
        lines.append(f"phase {ph['phase']}: host {ph['host_ms_per_step']:.1f} ms{dev}")
    if summary.get("top_host"):
        lines.append(f"top {len(summary['top_host'])} host operators and runtime calls by self time:")
        lines.append(f"{'ms/step':>9} {'calls':>7}  name")
        lines.extend(f"{h['ms_per_step']:>9.2f} {h['calls_per_step']:>7.0f}  {h['name'][:100]}" for h in summary["top_host"])
    lines.append(f"top {len(summary['top_kernels'])} by time:")
    lines.append(f"{'ms/step':>9} {'%':>6} {'calls':>7}  {'class':<28} name")
    for k in summary["top_kernels"]:
        lines.append(f"{k['ms_per_step']:>9.2f} {k['percent']:>5.1f}% {k['calls_per_step']:>7.0f}  "
                     f"{k['class']:<28} {k['name'][:100]}")
    return "\n".join(lines)
