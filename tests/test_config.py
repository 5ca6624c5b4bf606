"""Config composition through Hydra, the shipped model configs, and bad-value errors."""

import math
import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf.errors import OmegaConfBaseException

from megatron_qwen2.checkpoint.hf import expected_native_shapes
from megatron_qwen2.config import Config, ModelConfig, ParallelConfig, TrainConfig, resolve_config

CONF = str(Path(__file__).resolve().parents[1] / "conf")


def load(*overrides, world_size=1):
    with initialize_config_dir(config_dir=CONF, version_base=None):
        return resolve_config(compose(config_name="config", overrides=list(overrides)), world_size)


def n_params(cfg):
    return sum(math.prod(s) for s in expected_native_shapes(cfg).values())


# (hidden, layers, heads, kv heads, head dim, ffn, vocab, tied, published size in billions)
SHIPPED = {
    "qwen2_0.5b": (896, 24, 14, 2, 64, 4864, 151936, True, 0.494),
    "qwen2_1.5b": (1536, 28, 12, 2, 128, 8960, 151936, True, 1.544),
    "qwen2_7b": (3584, 28, 28, 4, 128, 18944, 152064, False, 7.616),
    "qwen2_72b": (8192, 80, 64, 8, 128, 29568, 152064, False, 72.71),
    "qwen2_57b_a14b": (3584, 28, 28, 4, 128, 18944, 151936, False, 57.41),
}


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_models_match_published_shapes(name):
    m = load(f"model={name}").model
    hidden, layers, heads, kv, d, ffn, vocab, tied, billions = SHIPPED[name]
    assert (m.hidden_size, m.num_layers, m.num_attention_heads, m.num_kv_heads, m.kv_channels,
            m.ffn_hidden_size, m.vocab_size, m.tie_word_embeddings) == (hidden, layers, heads, kv, d, ffn, vocab, tied)
    assert m.rope_theta == 1e6 and m.rms_norm_eps == 1e-6
    assert n_params(m) / 1e9 == pytest.approx(billions, rel=2e-3)


def test_moe_shipped_config():
    m = load("model=qwen2_57b_a14b").model
    assert (m.num_experts, m.moe_top_k, m.moe_ffn_hidden_size, m.shared_expert_ffn_hidden_size) == (64, 8, 2560, 20480)
    assert not m.norm_topk_prob and m.aux_loss_coef == 0.001
    assert all(m.is_moe_layer(i) for i in range(m.num_layers))


def test_overrides_compose():
    cfg = load("model=qwen2_7b", "model.num_layers=4", "train.steps=3", "parallel.tp=2", "optim.lr=1e-4",
               world_size=2)
    assert cfg.model.num_layers == 4 and cfg.model.hidden_size == 3584
    assert cfg.train.steps == 3 and cfg.parallel.tp == 2 and cfg.optim.lr == 1e-4


@pytest.mark.parametrize("override,needle", [
    ("model.num_kv_heads=3", "model.num_attention_heads=4 is not divisible by model.num_kv_heads=3"),
    ("model.hidden_size=-8", "model.hidden_size must be a positive integer, got -8"),
    ("model.head_dim=7", "model.head_dim=7 must be even"),
    ("optim.schedule=step", "optim.schedule must be 'cosine', 'constant' or 'linear', got 'step'"),
    ("train.global_batch_size=6", "train.global_batch_size=6 is not divisible by train.micro_batch_size=4"),
    ("parallel.tp=0", "parallel.tp must be a positive integer, got 0"),
    ("parallel.pp=3", "world size 1 is not divisible by tp*pp*cp = 1*3*1 = 3"),
    ("train.dtype=fp8", "train.dtype must be 'fp32' or 'bf16', got 'fp8'"),
])
def test_bad_values_name_field_and_value(override, needle):
    with pytest.raises(ValueError, match="^" + re.escape(needle)):
        load(override)


def test_bad_moe_values():
    with pytest.raises(ValueError, match="model.moe_top_k=9 exceeds model.num_experts=8"):
        load("model=tiny_moe", "model.moe_top_k=9")
    with pytest.raises(ValueError, match=r"model.mlp_only_layers has indices outside \[0, 4\): \[7\]"):
        load("model=tiny_moe", "model.mlp_only_layers=[7]")


def test_unknown_field_and_wrong_type_are_rejected():
    with pytest.raises(OmegaConfBaseException, match="num_layer"):
        load("+model.num_layer=3")
    with pytest.raises(OmegaConfBaseException, match="model.num_layers"):
        load("model.num_layers=abc")


def test_layout_checks_against_model():
    with pytest.raises(ValueError, match=r"model.num_attention_heads=28 is not divisible by parallel.tp=8"):
        load("model=qwen2_7b", "parallel.tp=8", "train.global_batch_size=4", world_size=8)
    with pytest.raises(ValueError, match=r"model.num_experts=64 is not divisible by parallel.ep=3"):
        load("model=qwen2_57b_a14b", "parallel.ep=3", "train.micro_batch_size=1", "train.global_batch_size=3",
             world_size=3)
    # 57B-A14B's expert FFN is 2560: etp 3 does not split it.
    with pytest.raises(ValueError, match=r"model.moe_ffn_hidden_size=2560 is not divisible by parallel.etp=3"):
        load("model=qwen2_57b_a14b", "parallel.etp=3", "train.micro_batch_size=1", "train.global_batch_size=3",
             world_size=3)
    # tp 2 without sequence parallelism: each tp rank routes half of the 3 x 1 tokens.
    with pytest.raises(ValueError, match=r"= 3 tokens per micro-batch and cp rank are not divisible by parallel.tp=2"):
        load("model=tiny_moe", "parallel.tp=2", "parallel.sequence_parallel=false", "train.seq_length=3",
             "train.micro_batch_size=1", "train.global_batch_size=1", world_size=2)


def test_tensor_parallel_layout_checks():
    # 1.5B at tp 4: 12 query heads split, 2 kv heads each replicated on two ranks.
    cfg = load("model=qwen2_1.5b", "parallel.tp=4", "train.global_batch_size=4", "train.micro_batch_size=1",
               world_size=4)
    assert cfg.parallel.sequence_parallel is True  # on by default when tp > 1
    assert load("parallel.tp=1").parallel.sequence_parallel is False
    with pytest.raises(ValueError, match=r"model.num_kv_heads=3 and parallel.tp=2: one must divide the other"):
        load("model.num_attention_heads=6", "model.num_kv_heads=3", "model.head_dim=16", "parallel.tp=2",
             "train.global_batch_size=4", world_size=2)
    with pytest.raises(ValueError, match=r"train.seq_length=127 is not divisible by parallel.tp=2"):
        load("parallel.tp=2", "train.seq_length=127", world_size=2)
    assert load("parallel.tp=2", "parallel.sequence_parallel=false", "train.seq_length=127",
                world_size=2).train.seq_length == 127
    with pytest.raises(ValueError, match=r"parallel.bucket_size must be a positive integer, got 0"):
        load("parallel.bucket_size=0")


@pytest.mark.parametrize("override,needle", [
    ("optim.lr=inf", "optim.lr must be a finite number, got inf"),
    ("optim.lr=nan", "optim.lr must be a finite number, got nan"),
    ("optim.lr=-1e-4", "optim.lr must be > 0, got -0.0001"),
    ("optim.min_lr_ratio=-0.1", "optim.min_lr_ratio must be in [0, 1], got -0.1"),
    ("optim.beta1=1.0", "optim.beta1 must be in [0, 1), got 1.0"),
    ("optim.beta2=nan", "optim.beta2 must be a finite number, got nan"),
    ("optim.eps=0", "optim.eps must be > 0, got 0.0"),
    ("optim.eps=inf", "optim.eps must be a finite number, got inf"),
    ("optim.clip_grad=-1", "optim.clip_grad must be >= 0 (0 disables), got -1.0"),
    ("optim.clip_grad=inf", "optim.clip_grad must be a finite number, got inf"),
    ("optim.weight_decay=inf", "optim.weight_decay must be a finite number, got inf"),
    ("model.rope_theta=inf", "model.rope_theta must be a finite number, got inf"),
    ("data.split=[1.0,inf]", "data.split must be a finite number, got [1.0, inf]"),
    ("train.max_skipped_steps=0", "train.max_skipped_steps must be an integer >= 1"),
    ("train.loss_spike_factor=0.5", "train.loss_spike_factor must be 0 (off) or > 1, got 0.5"),
    ("train.loss_spike_factor=inf", "train.loss_spike_factor must be a finite number, got inf"),
    ("train.resume=sometimes", "train.resume must be true, false or force, got 'sometimes'"),
])
def test_impossible_numbers_are_rejected(override, needle):
    with pytest.raises(ValueError, match="^" + re.escape(needle)):
        load(override)


def test_resume_values():
    assert [load(f"train.resume={v}").train.resume for v in ("true", "false", "force")] == [True, False, "force"]
    t = load().train
    assert (t.max_skipped_steps, t.loss_spike_factor, t.resume) == (10, 3.0, True)


def test_resume_differences_split_what_must_match_from_what_may_change():
    import dataclasses

    from megatron_qwen2.config import format_differences, resume_differences

    old = dataclasses.asdict(load())
    new = dataclasses.asdict(load("train.seq_length=256", "model.hidden_size=96", "data.paths=[a/b]",
                                  "train.micro_batch_size=2", "train.steps=500", "optim.lr=1e-4",
                                  "parallel.tp=2", "model.name=renamed", "data.cache_dir=/elsewhere",
                                  "train.resume=force", world_size=2))
    del old["train"]["loss_spike_factor"]  # a checkpoint older than a field: not compared
    blocking, allowed = resume_differences(old, new)
    assert sorted(blocking) == ["data.paths", "model.hidden_size", "train.micro_batch_size", "train.seq_length"]
    assert blocking["train.seq_length"] == (128, 256)
    assert sorted(allowed) == ["data.cache_dir", "model.name", "optim.lr", "parallel.sequence_parallel",
                               "parallel.tp", "train.resume", "train.steps"]
    assert format_differences({"train.seq_length": (128, 256), "data.paths": (None, ["a/b"])}) == \
        'train.seq_length: 128 -> 256, data.paths: null -> ["a/b"]'
    assert resume_differences(old, dataclasses.asdict(load())) == ({}, {})


def test_unknown_override_keys_and_group_options_name_the_closest():
    from megatron_qwen2.config import check_overrides

    check_overrides(["model=tiny", "+experiment=7b", "train.steps=3", "hydra.run.dir=x", "data.paths=[a,b]",
                     "--cfg", "job", "++optim.lr=1e-3"], Path(CONF))
    with pytest.raises(ValueError, match=r"^unknown config key train.stepz .*closest valid keys are train.steps"):
        check_overrides(["train.stepz=3"], Path(CONF))
    with pytest.raises(ValueError, match=r"^unknown config key model.hiden_size .*model.hidden_size"):
        check_overrides(["+model.hiden_size=3"], Path(CONF))
    with pytest.raises(ValueError, match=r"^unknown model=tinyy: conf/model/ holds .*tiny, tiny_moe"):
        check_overrides(["model=tinyy"], Path(CONF))


@pytest.mark.parametrize("world,degrees,needle", [
    (6, dict(tp=4), "world size 6 is not divisible by tp*pp*cp"),
    (8, dict(tp=2, ep=3), "parallel.ep=3"),
    (8, dict(tp=0), "parallel.tp"),
])
def test_bad_layouts_are_rejected_with_the_numbers(world, degrees, needle):
    cfg = Config(model=ModelConfig(num_attention_heads=8, num_kv_heads=4, hidden_size=64, ffn_hidden_size=128,
                                   vocab_size=256), parallel=ParallelConfig(**degrees),
                 train=TrainConfig(micro_batch_size=1, global_batch_size=8))
    with pytest.raises(ValueError, match=re.escape(needle)):
        cfg.validate(world)


def test_interleaved_pipeline_micro_batches_are_checked_before_anything_is_built():
    cfg = Config(model=ModelConfig(num_layers=8), parallel=ParallelConfig(pp=4, vpp=2),
                 train=TrainConfig(micro_batch_size=1, global_batch_size=6))
    with pytest.raises(ValueError, match=r"multiple of parallel.pp=4"):
        cfg.validate(4)
    with pytest.raises(ValueError, match=r"parallel.pp_layout=\[4, 1\] must give 2 non-negative layer counts"):
        Config(model=ModelConfig(num_layers=6), parallel=ParallelConfig(pp=2, pp_layout=[4, 1])).validate(2)
