"""DPO in every kind of layout trains the same model as one process: dp and ep (MoE) with the
distributed optimizer, tp with sequence parallelism, pp (interleaved), cp with packed pairs, and dp x pp
with packed pairs and the precomputed reference; each step's DPO loss, rewards, pair count and grad
norm, and the final weights."""

from pathlib import Path

import pytest
import torch

from megatron_qwen2.checkpoint import save_native
from megatron_qwen2.config import Config, DataConfig, DpoConfig, ModelConfig, OptimConfig, ParallelConfig, TrainConfig
from megatron_qwen2.model import Qwen2Model
from megatron_qwen2.train import train
from tests.distributed import run_distributed
from tests.parallel.runs import assert_same_training, read_run

STEPS = 2
PREFERENCE = Path(__file__).resolve().parents[1] / "data" / "assets" / "preference.jsonl"
DENSE = dict(hidden_size=32, num_layers=4, num_attention_heads=4, num_kv_heads=2, ffn_hidden_size=64,
             vocab_size=4096)
MOE = dict(DENSE, num_layers=2, num_experts=4, moe_top_k=2, moe_ffn_hidden_size=16, shared_expert_ffn_hidden_size=32,
           aux_loss_coef=0.01)
MODELS = {"dense": DENSE, "moe": MOE}


def make_config(model: str, reference: Path, precompute: bool, pack: bool, **parallel) -> Config:
    return Config(
        model=ModelConfig(**MODELS[model]),
        parallel=ParallelConfig(bucket_size=5000, **parallel),
        optim=OptimConfig(lr=1e-3, warmup_steps=0, schedule="constant", clip_grad=0.5),
        data=DataConfig(format="preference", paths=[str(PREFERENCE)], preference_packing=pack),
        # Packed rows of 257 tokens hold two pairs of the file or one; single rows of 65 cut the longer pairs.
        train=TrainConfig(steps=STEPS, micro_batch_size=1, global_batch_size=4, seq_length=256 if pack else 64,
                          log_interval=1),
        dpo=DpoConfig(reference=str(reference), precompute_reference=precompute),
    )


def _worker(rank, world_size, cfg, run_dir):
    train(cfg, run_dir)
    return rank


@pytest.fixture(scope="module")
def tmp_root(tmp_path_factory):
    return tmp_path_factory.mktemp("dpo_equivalence")


def reference_checkpoint(model: str, tmp_root: Path) -> Path:
    """Weights other than the policy's seeded start, so that the rewards are not zero."""
    path = tmp_root / f"reference-{model}"
    if not path.exists():
        cfg = ModelConfig(**MODELS[model])
        net = Qwen2Model(cfg)
        net.init_weights(seed=7)
        save_native({k: v.detach() for k, v in net.state_dict().items()}, cfg, path)
    return path


_single: dict = {}


def single_process_run(model: str, precompute: bool, pack: bool, tmp_root: Path):
    key = (model, precompute, pack)
    if key not in _single:
        run_dir = tmp_root / f"single-{model}-{precompute}-{pack}"
        train(make_config(model, reference_checkpoint(model, tmp_root), precompute, pack).validate(1), run_dir)
        _single[key] = read_run(run_dir)
    return _single[key]


CASES = [
    # (model, world size, precomputed reference, packed pairs, parallel config)
    ("moe", 2, False, False, dict(ep=2, distributed_optimizer=True)),  # dp 2, the experts split over it
    ("dense", 2, False, False, dict(tp=2, sequence_parallel=True)),
    ("dense", 2, False, False, dict(pp=2, vpp=2)),
    ("dense", 2, False, True, dict(cp=2)),
    ("dense", 4, True, True, dict(pp=2)),  # dp 2: the ranks' rows hold different numbers of pairs
]


def _case_id(case):
    model, world, precompute, pack, par = case
    return (f"{model}-w{world}-{'precomputed' if precompute else 'frozen'}-{'packed' if pack else 'single'}-"
            + "-".join(f"{k}={v}" for k, v in par.items()))


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_dpo_matches_single_process(case, tmp_root):
    model, world, precompute, pack, parallel = case
    ref_rows, ref_state = single_process_run(model, precompute, pack, tmp_root)
    assert abs(ref_rows[0]["dpo_chosen_reward"]) > 1e-3  # the reference differs from the policy
    run_dir = tmp_root / _case_id(case)
    run_distributed(_worker, world, make_config(model, reference_checkpoint(model, tmp_root), precompute, pack,
                                                **parallel), run_dir)
    rows, state = read_run(run_dir)
    assert_same_training(rows, state, ref_rows, ref_state, STEPS)
    for r, ref in zip(rows, ref_rows):
        for key in ("dpo_chosen_reward", "dpo_rejected_reward", "dpo_margin"):
            assert r[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-6), (r["step"], key)
        assert r["dpo_accuracy"] == ref["dpo_accuracy"] and r["dpo_pairs"] == ref["dpo_pairs"]
    if precompute:
        table = torch.load(run_dir / "dpo_reference_logps.pt", weights_only=True)["logps"]
        ref_table = torch.load(tmp_root / f"single-{model}-True-{pack}" / "dpo_reference_logps.pt",
                               weights_only=True)["logps"]
        for name in ref_table:
            torch.testing.assert_close(table[name], ref_table[name], rtol=1e-6, atol=1e-5)
