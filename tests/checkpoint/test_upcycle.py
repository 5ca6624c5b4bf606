"""Dense -> MoE upcycling: the equivalence mode reproduces the dense logits, the default recipe has
the stated replication / shuffle / re-init statistics, it runs at 7B -> 57B-A14B widths, and bad
arguments are rejected with clear errors."""

import dataclasses

import pytest
import torch

from megatron_qwen2.checkpoint import expected_native_shapes, load_model, save_native
from megatron_qwen2.checkpoint.upcycle import UpcycleArgs, expert_neurons, main, upcycle_state
from megatron_qwen2.config import ModelConfig
from megatron_qwen2.model import Qwen2Model

DENSE = ModelConfig(name="dense", hidden_size=32, num_layers=2, num_attention_heads=4, num_kv_heads=2,
                    ffn_hidden_size=64, vocab_size=256, init_std=0.1)


def dense_state(cfg=DENSE, seed=3):
    model = Qwen2Model(cfg)
    model.init_weights(seed)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_equivalence_mode_reproduces_dense_logits(tmp_path):
    save_native(dense_state(), DENSE, tmp_path / "dense")
    argv = ["--input", str(tmp_path / "dense"), "--output", str(tmp_path / "moe"), "--num-experts", "8",
            "--top-k", "2", "--expert-ffn-size", "16", "--shared-expert-ffn-size", "56", "--reinit-fraction", "0",
            "--seed", "1", "--equivalence", "--no-progress"]
    assert main(argv) == 0
    dense = load_model(tmp_path / "dense", dtype=torch.float64)
    moe = load_model(tmp_path / "moe", dtype=torch.float64)
    assert moe.cfg.num_experts == 8 and all(layer.is_moe for layer in moe.layers.values())
    ids = torch.randint(0, DENSE.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(moe(ids), dense(ids), rtol=1e-10, atol=1e-10)
        # The experts carry a share of the function: zeroing them changes the logits.
        for layer in moe.layers.values():
            layer.mlp.experts.down_weight.zero_()
        assert not torch.allclose(moe(ids), dense(ids), rtol=1e-3, atol=1e-3)


ARGS = UpcycleArgs(num_experts=8, top_k=2, expert_ffn_size=24, shared_expert_ffn_size=64, reinit_fraction=0.5,
                   seed=5)


def test_default_recipe_statistics():
    state = dense_state()
    out, cfg = upcycle_state(state, DENSE, ARGS)
    assert cfg.num_experts == 8 and cfg.moe_top_k == 2 and cfg.moe_ffn_hidden_size == 24
    for name, v in state.items():  # attention, norms, embedding (tied) copied
        if ".mlp." not in name:
            assert torch.equal(out[name], v), name
    n, fe, f, h = 8, 24, 64, 32
    for i in range(DENSE.num_layers):
        p = f"layers.{i}.mlp."
        gate, up = state[p + "gate_up.weight"]
        down = state[p + "down.weight"]
        idx = expert_neurons(f, ARGS, i)
        # ceil(8 * 24 / 64) = 3 replicas, each a permutation, cut into experts: every dense neuron 3 times.
        assert torch.equal(torch.sort(idx.reshape(3, f), dim=1).values, torch.arange(f).expand(3, f))
        gu, dn = out[p + "experts.gate_up_weight"], out[p + "experts.down_weight"]
        source = torch.cat([gate[idx], up[idx]], dim=1)  # [n, 2 fe, h], what the copy should hold
        source_down = down[:, idx].permute(1, 0, 2)  # [n, h, fe]
        kept = torch.cat([(gu == source).reshape(n, -1), (dn == source_down).reshape(n, -1)], dim=1).float()
        # Re-initialised with probability 0.5 per element: each expert keeps about half (2304 elements).
        assert ((kept.mean(1) - 0.5).abs() < 0.06).all(), kept.mean(1)
        fresh = torch.cat([gu[gu != source], dn[dn != source_down]])
        assert abs(fresh.std().item() / DENSE.init_std - 1) < 0.1 and abs(fresh.mean().item()) < 0.01
        # The shared expert is the dense FFN with its neurons shuffled (64 == F: one replica).
        sgu, sdn = out[p + "shared_expert.gate_up.weight"], out[p + "shared_expert.down.weight"]
        order = torch.stack([torch.nonzero((gate == row).all(1)).squeeze() for row in sgu[0]])
        assert torch.equal(order.sort().values, torch.arange(f)) and not torch.equal(order, torch.arange(f))
        assert torch.equal(sgu[1], up[order]) and torch.equal(sdn, down[:, order])
        assert torch.equal(out[p + "shared_expert_gate.weight"], torch.zeros(1, h))
        assert 0.0015 < out[p + "router.weight"].std().item() < 0.0025


def test_deterministic_per_seed():
    state = dense_state()
    a, _ = upcycle_state(state, DENSE, ARGS)
    b, _ = upcycle_state(state, DENSE, ARGS)
    c, _ = upcycle_state(state, DENSE, dataclasses.replace(ARGS, seed=6))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["layers.0.mlp.experts.gate_up_weight"], c["layers.0.mlp.experts.gate_up_weight"])


def test_qwen2_7b_to_57b_a14b_widths_at_one_layer():
    """7B width (hidden 3584, FFN 18944) -> 64 experts of 2560, top-8, shared 20480; one layer, small vocab."""
    dense = ModelConfig(name="qwen2_7b_1layer", hidden_size=3584, num_layers=1, num_attention_heads=28,
                        num_kv_heads=4, ffn_hidden_size=18944, vocab_size=512)
    gen = torch.Generator().manual_seed(0)
    state = {k: torch.randn(s, generator=gen).to(torch.bfloat16) for k, s in expected_native_shapes(dense).items()}
    args = UpcycleArgs(num_experts=64, top_k=8, expert_ffn_size=2560, shared_expert_ffn_size=20480,
                       reinit_fraction=0.0, seed=1)
    out, cfg = upcycle_state(state, dense, args)
    assert {k: tuple(v.shape) for k, v in out.items()} == expected_native_shapes(cfg)
    idx = expert_neurons(18944, args, 0)  # 64 * 2560 = 163840 -> 9 replicas of 18944
    counts = torch.bincount(idx.reshape(-1), minlength=18944)
    assert counts.min() >= 8 and counts.max() <= 9 and counts.sum() == 64 * 2560
    gate_up = state["layers.0.mlp.gate_up.weight"]
    e = 37
    assert torch.equal(out["layers.0.mlp.experts.gate_up_weight"][e, :2560], gate_up[0, idx[e]])
    assert torch.equal(out["layers.0.mlp.experts.down_weight"][e], state["layers.0.mlp.down.weight"][:, idx[e]])


@pytest.mark.parametrize("change, message", [
    (dict(expert_ffn_size=65), "does not fit in the dense FFN of size 64"),
    (dict(expert_ffn_size=0), "--expert-ffn-size must be >= 1"),
    (dict(top_k=9), r"--top-k must be in \[1, --num-experts=8\]"),
    (dict(num_experts=0), "--num-experts must be >= 1"),
    (dict(reinit_fraction=1.5), r"--reinit-fraction must be in \[0, 1\]"),
    (dict(shared_expert_ffn_size=-1), "--shared-expert-ffn-size must be >= 0"),
    (dict(equivalence=True), "--equivalence needs --reinit-fraction 0"),
    (dict(equivalence=True, reinit_fraction=0.0, shared_expert_ffn_size=32), "too small"),
])
def test_bad_arguments_are_rejected(change, message):
    with pytest.raises(ValueError, match=message):
        upcycle_state(dense_state(), DENSE, dataclasses.replace(ARGS, **change))


def test_cli_rejects_moe_input_and_existing_output(tmp_path, capsys):
    moe_cfg = dataclasses.replace(DENSE, num_experts=4, moe_top_k=2, moe_ffn_hidden_size=16)
    save_native(dense_state(moe_cfg), moe_cfg, tmp_path / "moe")
    common = ["--num-experts", "8", "--top-k", "2", "--expert-ffn-size", "16", "--shared-expert-ffn-size", "0"]
    assert main(["--input", str(tmp_path / "moe"), "--output", str(tmp_path / "out")] + common) == 2
    assert "already an MoE model" in capsys.readouterr().err
    assert main(["--input", str(tmp_path / "moe"), "--output", str(tmp_path / "moe"), "--overwrite"] + common) == 2
    assert "holds the input" in capsys.readouterr().err
    assert main(["--input", str(tmp_path / "moe"), "--output", str(tmp_path)] + common) == 2
    assert "holds the input" in capsys.readouterr().err
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    assert main(["--input", str(tmp_path / "moe"), "--output", str(tmp_path / "taken")] + common) == 2
    assert "already exists" in capsys.readouterr().err and (tmp_path / "taken" / "keep.txt").read_text() == "mine"
    assert not (tmp_path / "out").exists()
