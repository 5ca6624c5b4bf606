"""Tensor, sequence, pipeline and data parallelism (with or without the distributed optimizer)
train the same model as one process: same losses and grad norms each step, same weights after."""

import pytest

from megatron_qwen2.config import Config, DataConfig, ModelConfig, OptimConfig, ParallelConfig, TrainConfig
from megatron_qwen2.train import train
from tests.distributed import run_distributed
from tests.parallel.runs import assert_same_training, read_run

STEPS = 3
DENSE = dict(hidden_size=32, num_layers=2, num_attention_heads=4, num_kv_heads=2, ffn_hidden_size=64,
             vocab_size=4096)
MOE = dict(DENSE, num_experts=4, moe_top_k=2, moe_ffn_hidden_size=16, shared_expert_ffn_hidden_size=32,
           aux_loss_coef=0.01)
# Four layers for the pipeline; the first MoE model layer is dense, so a stage may pass on
# router sums it did not add to.
MODELS = {"dense": DENSE, "moe": MOE, "dense4": dict(DENSE, num_layers=4),
          "moe4": dict(MOE, num_layers=4, mlp_only_layers=[0])}


def make_config(model: dict, tied: bool, cache_dir: str, **parallel) -> Config:
    return Config(
        model=ModelConfig(tie_word_embeddings=tied, **model),
        # A small bucket size gives several buckets, each padded to a multiple of dp.
        parallel=ParallelConfig(bucket_size=5000, **parallel),
        optim=OptimConfig(lr=1e-3, warmup_steps=1, clip_grad=0.5),
        data=DataConfig(max_files=20, cache_dir=cache_dir),
        train=TrainConfig(steps=STEPS, micro_batch_size=1, global_batch_size=4, seq_length=16, log_interval=1),
    )


def _worker(rank, world_size, cfg, run_dir):
    train(cfg, run_dir)
    return rank


_reference: dict = {}


def reference_run(model_name: str, tied: bool, tmp_root) -> tuple:
    key = (model_name, tied)
    if key not in _reference:
        run_dir = tmp_root / f"ref-{model_name}-{tied}"
        run_dir.mkdir()
        cfg = make_config(MODELS[model_name], tied, str(tmp_root / "cache"))
        train(cfg.validate(1), run_dir)
        _reference[key] = read_run(run_dir)
    return _reference[key]


@pytest.fixture(scope="module")
def tmp_root(tmp_path_factory):
    return tmp_path_factory.mktemp("equivalence")


CASES = [
    # (model, tied, world size, parallel config)
    ("dense", False, 2, dict(tp=1)),
    ("moe", True, 2, dict(tp=1, distributed_optimizer=True)),
    ("dense", True, 2, dict(tp=2, sequence_parallel=False)),
    ("moe", False, 2, dict(tp=2, sequence_parallel=True)),
    ("dense", False, 4, dict(tp=2, sequence_parallel=True, distributed_optimizer=True)),
    ("moe", True, 4, dict(tp=2, sequence_parallel=True, distributed_optimizer=False)),
    ("dense", True, 4, dict(tp=4, sequence_parallel=True)),  # 2 kv heads replicated over 4 ranks
    ("dense", False, 4, dict(tp=1, distributed_optimizer=True, overlap_grad_reduce=False)),
    # Pipeline: 1F1B, interleaved, uneven and empty stages, and 3D (tp x pp x dp).
    ("dense4", False, 2, dict(pp=2)),
    ("moe4", True, 2, dict(pp=2, vpp=2)),
    ("dense4", True, 4, dict(pp=4)),
    ("dense4", False, 4, dict(pp=4, vpp=2, pp_layout=[1, 0, 1, 0, 0, 1, 0, 1])),
    ("moe4", False, 4, dict(tp=2, pp=2, pp_layout=[3, 1])),
    ("dense4", True, 8, dict(tp=2, pp=2, distributed_optimizer=True)),
    ("moe4", True, 8, dict(tp=2, pp=2, vpp=2)),
]


def _case_id(case):
    model, tied, world, par = case
    flags = "-".join(f"{k}={v}" for k, v in par.items())
    return f"{model}-{'tied' if tied else 'untied'}-w{world}-{flags}"


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_parallel_training_matches_single_process(case, tmp_root):
    model_name, tied, world, parallel = case
    ref_rows, ref_state = reference_run(model_name, tied, tmp_root)
    run_dir = tmp_root / _case_id(case)
    run_dir.mkdir()
    cfg = make_config(MODELS[model_name], tied, str(tmp_root / "cache"), **parallel)
    run_distributed(_worker, world, cfg, run_dir)
    rows, state = read_run(run_dir)
    assert_same_training(rows, state, ref_rows, ref_state, STEPS)
