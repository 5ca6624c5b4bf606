"""Search the folded MoE layouts of a recipe with the planner (CPU only, no GPU run).

    python bench/plan_folding.py +experiment=57b_a14b --gpus 64 --gpu h100-80gb \
        [--baseline-tree DIR] [--out bench/results/FILE.json]

Every layout of pp, ep and etp (and of the tp, cp and vpp given by `--tp`, `--cp`, `--vpp`; by default
the recipe's) that `Config.validate` accepts on `--gpus` GPUs (the recipe's batch, sequence, dtype
and distributed optimizer kept) is planned (megatron_qwen2/planner.py) with the least recomputation
that fits: none, then selective, then full recomputation of the first 1, 2, ... layers of each model
chunk. The fitting layouts are ranked by recomputed FLOPs, then by planned step time. The attention
layout stays the recipe's unless asked: the planner's step time counts the pipeline bubble and the
MoE token exchanges, but not the cost of a larger tp, of cp's ring or of more interleaved chunks'
sends, so it would favour them for free. The given layout itself is planned too
(`given_layout_folded`); `--baseline-tree` names the files of another commit (the layout before
folding, say) whose `tools/plan.py` plans the given layout as well, with and without its
recomputation (`recipe_before_folding`).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron_qwen2.planner import GiB, make_plan  # noqa: E402
from tools.plan import compose  # noqa: E402


def _divisors(n: int, limit: int) -> list[int]:
    return [d for d in range(1, min(n, limit) + 1) if n % d == 0]


def recompute_levels(layers_per_chunk: int) -> list[tuple[str, int | None]]:
    """(train.recompute, train.recompute_num_layers) from the least recomputation to the most."""
    return [("none", None), ("selective", None)] + [("full", n) for n in range(1, layers_per_chunk + 1)]


def layouts(cfg, gpus: int, tps: list[int], cps: list[int], vpps: list[int]):
    """Every (tp, cp, pp, vpp, ep, etp) whose config validates on `gpus` GPUs, as validated configs
    (recompute off)."""
    m = cfg.model
    for tp in tps:
        for cp in cps:
            for pp in _divisors(gpus // (tp * cp), 8):
                for vpp in [v for v in vpps if m.num_layers % (pp * v) == 0 and (pp > 1 or v == 1)]:
                    stage = gpus // pp
                    for ep in _divisors(m.num_experts, stage):
                        for etp in _divisors(m.moe_ffn_hidden_size, 8):
                            c = copy.deepcopy(cfg)
                            p = c.parallel
                            p.tp, p.cp, p.pp, p.vpp, p.ep, p.etp = tp, cp, pp, vpp, ep, etp
                            p.sequence_parallel, p.pp_layout = None, None
                            c.train.recompute, c.train.recompute_num_layers = "none", None
                            try:
                                yield c.validate(gpus)
                            except ValueError:
                                continue


def summary(plan) -> dict:
    p, t = plan.cfg.parallel, plan.cfg.train
    return {
        "tp": p.tp, "cp": p.cp, "pp": p.pp, "vpp": p.vpp, "dp": plan.dp, "ep": p.ep, "etp": p.etp,
        "expert_dp": p.tp * p.cp * plan.dp // (p.ep * p.etp), "sequence_parallel": p.sequence_parallel_on,
        "recompute": t.recompute, "recompute_num_layers": t.recompute_num_layers,
        "most_loaded_gib": round(plan.worst.total / GiB, 2), "most_loaded_pp_rank": plan.worst.pp_rank,
        "per_stage_gib": [round(r.total / GiB, 2) for r in plan.ranks],
        "recompute_flops": plan.recompute_flops, "exchange_s": round(plan.exchange_s, 3),
        "bubble": round(plan.bubble_simulated, 4), "step_time_s": round(plan.step_time_s, 3),
        "mfu": round(plan.mfu, 4),
    }


def least_recompute_plan(cfg, gpus: int, gpu: str):
    """The plan of `cfg` with the least recomputation that fits, or None."""
    per_chunk = max(len(ids) for ids in _stage_layers(cfg))
    for mode, n in recompute_levels(per_chunk):
        c = copy.deepcopy(cfg)
        c.train.recompute, c.train.recompute_num_layers = mode, n
        plan = make_plan(c, gpus, gpu)
        if plan.fits:
            return plan
    return None


def _stage_layers(cfg):
    from megatron_qwen2.engine.pipeline import stage_layers
    return stage_layers(cfg.model, cfg.parallel)


def baseline(tree: Path, commit: str, overrides: list[str], gpus: int, gpu: str) -> dict:
    """What `tools/plan.py` of the tree of `commit` (unpacked at `tree`) prints for the recipe, with and
    without its recomputation."""
    out = {"commit": commit, "tree": f"git archive {commit} | tar -x -C DIR"}
    env = dict(os.environ, PYTHONPATH=str(tree))
    for key, extra in (("recipe", []), ("without_recompute", ["train.recompute=none"])):
        cmd = [sys.executable, "tools/plan.py", *overrides, *extra, "--gpus", str(gpus), "--gpu", gpu]
        text = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True).stdout
        total = re.search(r"^  total\s+([\d.]+) GiB", text, re.M)
        step = re.search(r"-> step ([\d.]+) s, MFU ([\d.]+)%", text)
        out[key] = {"command": " ".join(["python", "tools/plan.py", *overrides, *extra, "--gpus", str(gpus),
                                         "--gpu", gpu]),
                    "most_loaded_gib": float(total.group(1)) if total else None,
                    "step_time_s": float(step.group(1)) if step else None,
                    "mfu": round(float(step.group(2)) / 100, 4) if step else None}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--gpus", type=int, required=True)
    parser.add_argument("--gpu", default="h100-80gb")
    parser.add_argument("--tp", type=int, nargs="+", help="tp degrees to search (default: the recipe's)")
    parser.add_argument("--cp", type=int, nargs="+", help="cp degrees to search (default: the recipe's)")
    parser.add_argument("--vpp", type=int, nargs="+", help="vpp degrees to search (default: the recipe's)")
    parser.add_argument("--top", type=int, default=10, help="fitting layouts kept in the file")
    parser.add_argument("--baseline-tree", type=Path, help="the files of another commit (git archive COMMIT | "
                        "tar -x -C DIR), whose planner also plans the recipe")
    parser.add_argument("--baseline-commit", default="unknown", help="the commit of --baseline-tree")
    parser.add_argument("--out", type=Path)
    args = parser.parse_intermixed_args(argv)

    recipe_cfg = compose(args.overrides, args.gpus)
    recipe = make_plan(recipe_cfg, args.gpus, args.gpu)
    p = recipe_cfg.parallel
    tps, cps, vpps = args.tp or [p.tp], args.cp or [p.cp], args.vpp or [p.vpp]
    fitting = [plan for c in layouts(recipe_cfg, args.gpus, tps, cps, vpps)
               if (plan := least_recompute_plan(c, args.gpus, args.gpu)) is not None]
    fitting.sort(key=lambda plan: (plan.recompute_flops, plan.step_time_s))
    best = fitting[0] if fitting else None
    print(f"the given layout, folded: {summary(recipe)}")
    print(f"{len(fitting)} layouts fit; the least recomputation, then the fastest:")
    for plan in fitting[:args.top]:
        print(f"  {summary(plan)}")
    commit = os.environ.get("GIT_COMMIT") or subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    result = {
        "what": "planner search of the folded MoE layouts of a recipe: the least recomputation that fits, then "
                "the shortest planned step",
        "command": " ".join(["python", "bench/plan_folding.py", *args.overrides, "--gpus", str(args.gpus),
                             "--gpu", args.gpu]
                            + [f"--{k} " + " ".join(map(str, v)) for k, v in (("tp", args.tp), ("cp", args.cp),
                                                                              ("vpp", args.vpp)) if v]
                            + ([f"--baseline-tree DIR --baseline-commit {args.baseline_commit}"] if args.baseline_tree else [])),
        "searched": {"tp": tps, "cp": cps, "vpp": vpps, "pp": "divisors of the GPUs left, up to 8",
                     "ep": "divisors of model.num_experts", "etp": "divisors of model.moe_ffn_hidden_size, up to 8",
                     "recompute": "none, selective, full of the first 1, 2, ... layers of each chunk"},
        "device": "planner (CPU)", "commit": commit,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
        "gpus": args.gpus, "gpu": args.gpu,
        "given_layout_folded": summary(recipe), "best": None if best is None else summary(best),
        "fitting_layouts": len(fitting), "top": [summary(p) for p in fitting[:args.top]],
        "note": "step_time_s includes exchange_s, the MoE token exchanges at the planner's assumed bandwidth "
                "(planner.py EXCHANGE_GBPS); a planner without them prints the step without that term",
    }
    if args.baseline_tree:
        result["recipe_before_folding"] = baseline(args.baseline_tree, args.baseline_commit, args.overrides,
                                                   args.gpus, args.gpu)
        print(f"before folding: {result['recipe_before_folding']}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
