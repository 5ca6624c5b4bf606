"""DPO training throughput on one device: our DPO step against TRL's DPOTrainer or the same loss on
Hugging Face models in a plain loop, on the same preference pairs, in the same run.

    python bench/dpo_throughput.py --model qwen2_1.5b [--layers N] [--seq 4096] [--mbs 1] [--gbs 8]
        [--steps 10] [--warmup 3] [--recompute none|full] [--precompute-reference] [--profile]
        [--baseline trl hf-loop] [--no-pack] [--device auto|cuda|cpu] [--out FILE]

The pairs: `--pairs` prompts and responses of random words (seeded), tokenised with the
repository's tokenizer (ids below every Qwen2 vocabulary); prompts of `--prompt-words` and responses
of `--response-words` words (uniform ranges), each response ending with <|endoftext|>. Every system
trains on those pairs, gbs pairs per optimizer step, mbs pairs per micro-batch, from the same
initial weights, with its reference equal to the policy's start (so each first loss is ln 2), and
`--recompute` sets every system's activation recomputation alike: `full` recomputes each decoder
layer in the backward (ours train.recompute=full, TRL's and the loop's gradient checkpointing),
`none` keeps the activations (TRL's DPOConfig checkpoints unless told not to):

- megatron_qwen2: `TrainingStep` with data.format=preference (engine/dpo.py), bf16 compute with fp32
  masters, the frozen reference in bf16 (`ReferenceModel`), rows of `--seq` + 1 tokens packed with
  whole pairs (data.preference_packing; `--no-pack`: one pair per row), two documents each, with
  packed-document attention; a step is gbs rows, mbs rows per micro-batch. `--precompute-reference`:
  dpo.precompute_reference=true, the reference's log-probabilities of every pair computed first in
  one forward-only pass (dpo_reference.dataset_logps) and no reference model in the step; that pass
  is timed, and each timed step is charged its share of it (pass seconds x the step's tokens / the
  tokens of all pairs);
- trl: TRL's DPOTrainer (sigmoid loss, beta 0.1, bf16=True: fp32 weights and autocast, its reference a
  copy of the policy), the pairs given as text; each timed step is one optimizer step of its own
  sampling of the pairs;
- hf-loop: Qwen2ForCausalLM policy (fp32 weights, bf16 autocast, fused AdamW) and a frozen copy as
  the reference, the same sigmoid loss on per-response log-probability sums, chosen and rejected
  rows of a micro-batch padded to their longest.

`--profile` adds torch.profiler over 2 more steps of ours (bench/profile_summary.py: time per op
class, host and device time per phase, the top kernels), printed and written into its row.

tokens/s counts the tokens of the pairs as each system feeds them (prompt twice, both responses;
not the padding); peak memory is the device's peak allocated during the system's steps.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Run as a script, bench/ itself would come first on the path, and bench/kernels.py would shadow the
# `kernels` package that transformers imports.
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.common import device_name, device_slug, write_result_file  # noqa: E402
from bench.profile_summary import format_summary, profile_steps  # noqa: E402
from bench.train_baselines import hf_model  # noqa: E402
from bench.train_throughput import (check_batch_args, memory, model_config, pick_device, reset_memory,  # noqa: E402
                                    sync)

BETA = 0.1
LR = 1e-6
WORDS = ("the quick brown fox jumps over lazy dog model train data pair chosen rejected answer question "
         "reason step value graph layer token memory speed batch proof number river mountain city light "
         "sound paper water stone music garden window table letter summer winter north south").split()


def make_pairs(count: int, prompt_words: tuple[int, int], response_words: tuple[int, int], seed: int) -> list[dict]:
    """Text pairs {"prompt", "chosen", "rejected"} of random words; responses end with <|endoftext|>."""
    rng = np.random.default_rng(seed)

    def text(lo_hi):
        return " ".join(rng.choice(WORDS, size=int(rng.integers(lo_hi[0], lo_hi[1] + 1))))

    return [{"prompt": text(prompt_words) + "\n", "chosen": text(response_words) + "<|endoftext|>",
             "rejected": text(response_words) + "<|endoftext|>"} for _ in range(count)]


def hf_tokenizer():
    import transformers

    from megatron_qwen2.data.tokenizer import EOD_TOKEN, REPO_TOKENIZER

    return transformers.PreTrainedTokenizerFast(tokenizer_file=str(REPO_TOKENIZER), eos_token=EOD_TOKEN,
                                                pad_token=EOD_TOKEN)


def tokenised(pairs: list[dict]) -> list[tuple[list[int], list[int], list[int]]]:
    """(prompt, chosen, rejected) token ids of each pair, as TRL cuts them: the common prefix of the
    prompt's and prompt + response's tokens is the prompt."""
    from tokenizers import Tokenizer

    from megatron_qwen2.data.tokenizer import REPO_TOKENIZER

    tok = Tokenizer.from_file(str(REPO_TOKENIZER))
    out = []
    for p in pairs:
        prompt = tok.encode(p["prompt"]).ids
        chosen = tok.encode(p["prompt"] + p["chosen"]).ids
        rejected = tok.encode(p["prompt"] + p["rejected"]).ids
        k = min(len(prompt), *(next((i for i, (a, b) in enumerate(zip(prompt, r)) if a != b), len(prompt))
                               for r in (chosen, rejected)))
        out.append((prompt[:k], chosen[k:], rejected[k:]))
    return out


def pair_tokens(ids) -> int:
    prompt, chosen, rejected = ids
    return 2 * len(prompt) + len(chosen) + len(rejected)


def time_steps(step, device, warmup: int, steps: int) -> dict:
    """step() -> (loss, tokens fed); warm-up steps untimed. A step with a precomputing pass
    (`step.reference_pass`: seconds, tokens) is charged its share of that pass."""
    losses, times, tokens = [], [], 0
    seconds, pass_tokens = getattr(step, "reference_pass", None) or (0.0, 1)
    for i in range(warmup + steps):
        began = time.perf_counter()
        loss, fed = step()
        sync(device)
        losses.append(loss)
        if i >= warmup:
            times.append(time.perf_counter() - began + seconds * fed / pass_tokens)
            tokens += fed
    return {"losses": losses, "step_times_s": times, "tokens": tokens}


def score(name: str, timed: dict, device) -> dict:
    total = sum(timed["step_times_s"])
    return {"system": name, "tokens_per_s": timed["tokens"] / total, "step_time_s_mean": total / len(timed["step_times_s"]),
            "step_times_s": timed["step_times_s"], "losses": timed["losses"], "loss_first": timed["losses"][0],
            "loss_last": timed["losses"][-1], **memory(device)}


class OurDpoStep:
    """TrainingStep with data.format=preference on one device; the reference holds the policy's start."""

    def __init__(self, mcfg, args, ids, device):
        from megatron_qwen2.config import Config, DataConfig, DpoConfig, OptimConfig, TrainConfig
        from megatron_qwen2.data.preference import Pair, PreferenceDataset
        from megatron_qwen2.dpo_reference import dataset_logps
        from megatron_qwen2.engine.step import TrainingStep
        from megatron_qwen2.parallel import Topology

        self.cfg = Config(model=mcfg, optim=OptimConfig(lr=LR, warmup_steps=0, schedule="constant", weight_decay=0.0),
                          data=DataConfig(format="preference", paths=["(bench pairs)"], preference_packing=args.pack),
                          train=TrainConfig(seq_length=args.seq, micro_batch_size=args.mbs, global_batch_size=args.gbs,
                                            dtype="bf16", seed=args.seed, recompute=args.recompute),
                          dpo=DpoConfig(precompute_reference=args.precompute_reference), device=device.type).validate(1)
        torch.manual_seed(args.seed)
        self.step = TrainingStep(self.cfg, Topology.build(self.cfg.parallel, 1, 0), device, init_on_device=True)
        if self.step.reference is not None:
            with torch.no_grad():  # the reference starts as the policy
                for ref, p in zip((q for c in self.step.reference.chunks for q in c.parameters()), self.step.params):
                    ref.copy_(p)
        arr = lambda x: np.asarray(x, dtype=np.int64)  # noqa: E731
        pairs = [Pair(arr(p), arr(c), np.ones(len(c), bool), arr(r), np.ones(len(r), bool)) for p, c, r in ids]
        self.data = PreferenceDataset(pairs, args.seq, args.seed, pad_id=0, vocab_size=mcfg.vocab_size, pack=args.pack)
        self.reference_pass = None  # (seconds, tokens of all pairs) of the precomputing pass
        if args.precompute_reference:  # the policy's start is the reference
            sync(device)
            began = time.perf_counter()
            self.data.attach_reference(dataset_logps(self.step, self.data))
            sync(device)
            self.reference_pass = (time.perf_counter() - began, sum(pair_tokens(i) for i in ids))
        self.ids, self.gbs, self.at = ids, args.gbs, 0

    def __call__(self):
        idx = np.arange(self.at, self.at + self.gbs)
        self.at += self.gbs
        loss = self.step(self.data.samples(idx), self.cfg.optim.lr).loss
        return loss, sum(pair_tokens(self.ids[i]) for r in self.data.order(idx) for i in self.data.rows[r])


def sequence_logps(model, input_ids, attention_mask, counted):
    """Per-row sums of the log-probabilities of the counted labels ([rows] fp32)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
    token_logps = torch.gather(logits.log_softmax(-1), 2, input_ids[:, 1:, None])[..., 0]
    return (token_logps * counted[:, 1:]).sum(-1)


class HFLoopStep:
    """Qwen2ForCausalLM policy + frozen copy, the sigmoid DPO loss in a plain loop (module docstring)."""

    def __init__(self, mcfg, args, ids, device):
        self.policy = hf_model(mcfg, args.seed, device)
        self.reference = copy.deepcopy(self.policy).eval().requires_grad_(False)
        self.policy.train()
        if args.recompute == "full":
            self.policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.optimizer = torch.optim.AdamW(self.policy.parameters(), lr=LR, weight_decay=0.0,
                                           fused=device.type == "cuda")
        self.ids, self.args, self.device, self.at = ids, args, device, 0

    def _micro(self, pairs):
        rows = [p + c for p, c, _ in pairs] + [p + r for p, _, r in pairs]
        counted = [[0] * len(p) + [1] * len(c) for p, c, _ in pairs] + [[0] * len(p) + [1] * len(r) for p, _, r in pairs]
        n = max(len(r) for r in rows)
        pad = lambda xs, v: torch.tensor([x + [v] * (n - len(x)) for x in xs], device=self.device)  # noqa: E731
        return pad(rows, 0), pad([[1] * len(r) for r in rows], 0), pad(counted, 0).float()

    def __call__(self):
        a = self.args
        idx = np.arange(self.at, self.at + a.gbs) % len(self.ids)
        self.at += a.gbs
        total = 0.0
        for m in range(0, a.gbs, a.mbs):
            pairs = [self.ids[i] for i in idx[m:m + a.mbs]]
            input_ids, attention, counted = self._micro(pairs)
            with torch.autocast(self.device.type, dtype=torch.bfloat16):
                with torch.no_grad():
                    ref = sequence_logps(self.reference, input_ids, attention, counted)
                pi = sequence_logps(self.policy, input_ids, attention, counted)
            b = len(pairs)
            logits = (pi[:b] - pi[b:]) - (ref[:b] - ref[b:])
            loss = -F.logsigmoid(BETA * logits).sum() / a.gbs
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(self.policy.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total, sum(pair_tokens(self.ids[i]) for i in idx)


def run_trl(mcfg, args, pairs, device) -> dict:
    """TRL's DPOTrainer on the text pairs; times each optimizer step and counts the tokens it feeds."""
    import datasets
    import transformers
    import trl

    policy = hf_model(mcfg, args.seed, device)
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    record = {"times": [], "tokens": [], "losses": [], "began": None, "fed": 0}

    class Timer(transformers.TrainerCallback):
        def on_step_begin(self, targs, state, control, **kw):
            sync(device)
            record["began"], record["fed"] = time.perf_counter(), 0

        def on_step_end(self, targs, state, control, **kw):
            sync(device)
            record["times"].append(time.perf_counter() - record["began"])
            record["tokens"].append(record["fed"])

        def on_log(self, targs, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                record["losses"].append(float(logs["loss"]))

    class CountingTrainer(trl.DPOTrainer):
        def training_step(self, model, inputs, *rest, **kw):
            record["fed"] += int(inputs["attention_mask"].sum())
            return super().training_step(model, inputs, *rest, **kw)

    with tempfile.TemporaryDirectory() as out:
        targs = trl.DPOConfig(output_dir=out, per_device_train_batch_size=args.mbs,
                              gradient_accumulation_steps=args.gbs // args.mbs, max_steps=args.warmup + args.steps,
                              learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                              max_grad_norm=1.0, beta=BETA, loss_type=["sigmoid"], max_length=None,
                              bf16=device.type == "cuda", use_cpu=device.type == "cpu", logging_steps=1,
                              save_strategy="no", report_to=[], seed=args.seed, dataloader_num_workers=0,
                              disable_tqdm=True, gradient_checkpointing=args.recompute == "full")
        trainer = CountingTrainer(model=policy, ref_model=reference, args=targs,
                                  train_dataset=datasets.Dataset.from_list(pairs), processing_class=hf_tokenizer(),
                                  callbacks=[Timer()])
        reset_memory(device)
        trainer.train()
    timed = {"losses": record["losses"], "step_times_s": record["times"][args.warmup:],
             "tokens": sum(record["tokens"][args.warmup:])}
    row = score("trl", timed, device)
    row["versions"] = {"trl": trl.__version__, "transformers": transformers.__version__, "datasets": datasets.__version__}
    return row


def measure(name: str, make, args, device) -> dict:
    """One system's row; a failure (not installed, out of memory ...) becomes an error row."""
    reset_memory(device)
    try:
        if name == "trl":
            row = make()
        else:
            step = make()
            row = score(name, time_steps(step, device, args.warmup, args.steps), device)
            if getattr(step, "reference_pass", None):
                row["reference_pass_s"], row["reference_pass_tokens"] = step.reference_pass
            if args.profile and name == "megatron_qwen2":
                row["profile"] = profile_steps(step, device)
                print(format_summary(row["profile"]), flush=True)
            del step
    except Exception as e:  # noqa: BLE001 - reported in the result
        traceback.print_exc()
        row = {"system": name, "error": f"{type(e).__name__}: {e}".splitlines()[0]}
    reset_memory(device)
    return row


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="qwen2_1.5b", help="a bench/train_throughput.py preset or conf/model name")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--seq", type=int, default=4096, help="our rows: seq + 1 tokens")
    ap.add_argument("--mbs", type=int, default=1, help="per micro-batch: our rows, the baselines' pairs")
    ap.add_argument("--gbs", type=int, default=None, help="per optimizer step: our rows, the baselines' pairs "
                    "(default: 8 x mbs)")
    ap.add_argument("--no-pack", dest="pack", action="store_false", help="our rows: one pair each")
    ap.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    ap.add_argument("--warmup", type=int, default=3, help="untimed optimizer steps first")
    ap.add_argument("--pairs", type=int, default=256, help="distinct preference pairs")
    ap.add_argument("--prompt-words", type=int, nargs=2, default=(30, 150), metavar=("MIN", "MAX"))
    ap.add_argument("--response-words", type=int, nargs=2, default=(60, 250), metavar=("MIN", "MAX"))
    ap.add_argument("--recompute", default="none", choices=("none", "full"),
                    help="every system's activation recomputation (module docstring)")
    ap.add_argument("--precompute-reference", action="store_true",
                    help="ours: dpo.precompute_reference=true, the pass charged to the steps (module docstring)")
    ap.add_argument("--profile", action="store_true", help="profile 2 more steps of ours (module docstring)")
    ap.add_argument("--baseline", nargs="*", default=["trl", "hf-loop"], choices=("trl", "hf-loop"))
    ap.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--commit", default=None)
    ap.add_argument("--out", default=None, help="result JSON (default: bench/results/dpo_throughput_<model>_<device>.json)")
    return check_batch_args(ap, ap.parse_args(argv), ("seq", "mbs", "gbs", "steps", "pairs"))


def main(argv=None) -> int:
    args = parse_args(argv)
    device = pick_device(args)
    mcfg = model_config(args.model, args.layers)
    pairs = make_pairs(args.pairs, tuple(args.prompt_words), tuple(args.response_words), args.seed)
    ids = tokenised(pairs)
    longest = max(pair_tokens(i) for i in ids)
    if longest > args.seq + 1:
        raise SystemExit(f"the longest pair has {longest} tokens, more than --seq {args.seq} + 1: raise --seq or "
                         "shorten --prompt-words / --response-words")
    mean = sum(pair_tokens(i) for i in ids) / len(ids)
    print(f"{device_name()}: {args.model} ({mcfg.num_layers} layers, hidden {mcfg.hidden_size}); {args.pairs} pairs "
          f"of {mean:.0f} tokens on average (longest {longest}) in rows of {args.seq + 1}; mbs {args.mbs}, gbs "
          f"{args.gbs}; recompute {args.recompute}; {args.warmup} warm-up + {args.steps} timed steps", flush=True)
    rows = [measure("megatron_qwen2", lambda: OurDpoStep(mcfg, args, ids, device), args, device)]
    for name in args.baseline:
        make = (lambda: run_trl(mcfg, args, pairs, device)) if name == "trl" else \
            (lambda: HFLoopStep(mcfg, args, ids, device))
        rows.append(measure(name, make, args, device))
    gib = lambda v: f"{v:.2f} GiB" if v is not None else "-"  # noqa: E731
    print(f"{'system':<16} {'tokens/s':>10} {'step s':>8} {'loss first':>10} {'peak alloc':>11}")
    for r in rows:
        if "error" in r:
            print(f"{r['system']:<16} {r['error']}")
        else:
            print(f"{r['system']:<16} {r['tokens_per_s']:>10.0f} {r['step_time_s_mean']:>8.3f} {r['loss_first']:>10.4f} "
                  f"{gib(r['mem_peak_allocated_gib']):>11}")
    ours = rows[0]
    comparison = {}
    for other in rows[1:]:
        if "error" not in other and "error" not in ours:
            comparison[other["system"]] = {"speedup": ours["tokens_per_s"] / other["tokens_per_s"]}
            if ours["mem_peak_allocated_gib"] is not None:
                comparison[other["system"]]["memory_ratio"] = (ours["mem_peak_allocated_gib"]
                                                               / other["mem_peak_allocated_gib"])
            print(f"megatron_qwen2 / {other['system']}: {comparison[other['system']]}", flush=True)
    payload = {
        "what": "DPO training throughput on one device: our DPO step vs TRL's DPOTrainer / HF models in a plain "
                "loop, the same pairs, reference = the policy's start",
        "command": " ".join(["bench/dpo_throughput.py", *(argv if argv is not None else sys.argv[1:])]),
        "model": args.model,
        "model_config": dict(vars(mcfg)),
        "config": {"seq": args.seq, "mbs": args.mbs, "gbs": args.gbs, "steps": args.steps, "warmup": args.warmup,
                   "pairs": args.pairs, "packed": args.pack, "prompt_words": list(args.prompt_words),
                   "response_words": list(args.response_words), "mean_pair_tokens": mean, "longest_pair_tokens": longest,
                   "beta": BETA, "lr": LR, "seed": args.seed, "ln2": math.log(2), "recompute": args.recompute,
                   "precompute_reference": args.precompute_reference},
        "results": rows,
        "comparison": comparison,
    }
    out = args.out or str(ROOT / "bench" / "results" / f"dpo_throughput_{args.model}_{device_slug()}.json")
    path = write_result_file(out, payload, args.commit)
    print(f"wrote {path}")
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
