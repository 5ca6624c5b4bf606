"""HF <-> native conversion: bit-exact round trips, logits parity, per-expert names, bad input."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from megatron_qwen2.checkpoint import load_model, load_native_state, save_native  # noqa: E402
from megatron_qwen2.checkpoint.convert import main as convert  # noqa: E402
from megatron_qwen2.checkpoint.hf_io import INDEX_FILE, read_hf_dir, write_hf_dir  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DENSE = dict(vocab_size=97, hidden_size=48, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=3,
             intermediate_size=40, rope_theta=10000.0, max_position_embeddings=128)
MOE = dict(DENSE, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
           shared_expert_intermediate_size=24, decoder_sparse_step=1, mlp_only_layers=[1], num_hidden_layers=3)


def make_hf(path: Path, kind: str, tied: bool, dtype=torch.float32, seed=0) -> Path:
    torch.manual_seed(seed)
    if kind == "dense":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**DENSE, tie_word_embeddings=tied))
    else:
        model = transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(**MOE, tie_word_embeddings=tied))
    with torch.no_grad():  # HF zero-initialises routers and biases: make every tensor matter
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.to(dtype).save_pretrained(path)
    return path


CASES = [("dense", True, torch.float32), ("dense", False, torch.bfloat16), ("moe", False, torch.float32),
         ("moe", True, torch.bfloat16)]


@pytest.mark.parametrize("kind,tied,dtype", CASES, ids=[f"{k}-{'tied' if t else 'untied'}-{str(d)[6:]}"
                                                       for k, t, d in CASES])
def test_round_trip_is_bit_exact(tmp_path, kind, tied, dtype):
    src = make_hf(tmp_path / "hf", kind, tied, dtype)
    assert convert(["hf-to-native", "--input", str(src), "--output", str(tmp_path / "native")]) == 0
    # A small shard size forces several safetensors files and an index.
    assert convert(["native-to-hf", "--input", str(tmp_path / "native"), "--output", str(tmp_path / "out"),
                    "--max-shard-size", "20KB"]) == 0
    assert (tmp_path / "out" / INDEX_FILE).is_file()
    first, _ = read_hf_dir(src)
    second, config = read_hf_dir(tmp_path / "out")
    if kind == "moe":
        assert "model.layers.0.mlp.experts.3.gate_proj.weight" in second
    # HF may keep experts fused on disk; compare in the per-expert form both ways.
    assert convert(["hf-to-native", "--input", str(tmp_path / "out"), "--output", str(tmp_path / "native2")]) == 0
    assert convert(["native-to-hf", "--input", str(tmp_path / "native2"), "--output", str(tmp_path / "out2"),
                    "--max-shard-size", "20KB"]) == 0
    third, _ = read_hf_dir(tmp_path / "out2")
    assert second.keys() == third.keys()
    for name in second:
        assert second[name].dtype == dtype and torch.equal(second[name], third[name]), name
    state1, _ = load_native_state(tmp_path / "native")
    state2, _ = load_native_state(tmp_path / "native2")
    assert state1.keys() == state2.keys() and all(torch.equal(state1[k], state2[k]) for k in state1)
    if set(first) == set(second):  # HF wrote per-expert (or dense) names: compare with the original
        assert all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize("kind,tied", [("dense", False), ("moe", True)])
def test_native_checkpoint_gives_hf_logits_and_exports_loadable_hf(tmp_path, kind, tied):
    src = make_hf(tmp_path / "hf", kind, tied)
    assert convert(["hf-to-native", "--input", str(src), "--output", str(tmp_path / "native")]) == 0
    assert convert(["native-to-hf", "--input", str(tmp_path / "native"), "--output", str(tmp_path / "out")]) == 0
    ids = torch.randint(0, DENSE["vocab_size"], (2, 19))
    model = load_model(tmp_path / "native")
    ref = transformers.AutoModelForCausalLM.from_pretrained(src).eval()
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        expected = ref(ids).logits
        assert (model(ids) - expected).abs().max().item() <= 1e-5
        assert torch.equal(back(ids).logits, expected)


def _corrupt(src: Path, edit) -> Path:
    tensors, config = read_hf_dir(src)
    edit(tensors)
    out = src.with_name(src.name + "-bad")
    write_hf_dir(tensors, config, out, progress=False)
    return out


@pytest.mark.parametrize("edit,needle", [
    (lambda t: t.pop("model.layers.1.self_attn.k_proj.bias"), "model.layers.1.self_attn.k_proj.bias"),
    (lambda t: t.update({"model.layers.0.extra.weight": torch.zeros(2)}), "model.layers.0.extra.weight"),
    (lambda t: t.update({"model.norm.weight": torch.zeros(5)}), "model.norm.weight"),
], ids=["missing", "extra", "misshaped"])
def test_bad_tensors_are_named_and_leave_no_output(tmp_path, capsys, edit, needle):
    bad = _corrupt(make_hf(tmp_path / "hf", "dense", False), edit)
    out = tmp_path / "native"
    assert convert(["hf-to-native", "--input", str(bad), "--output", str(out)]) == 2
    assert needle in capsys.readouterr().err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".native")]


def test_existing_output_and_bad_input_are_refused(tmp_path, capsys):
    src = make_hf(tmp_path / "hf", "dense", True)
    out = tmp_path / "native"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert convert(["hf-to-native", "--input", str(src), "--output", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err and (out / "keep.txt").read_text() == "mine"
    assert convert(["native-to-hf", "--input", str(src), "--output", str(tmp_path / "x")]) == 2
    assert "not a native checkpoint" in capsys.readouterr().err and not (tmp_path / "x").exists()
    assert convert(["hf-to-native", "--input", str(tmp_path / "nowhere"), "--output", str(tmp_path / "y")]) == 2
    assert "does not exist" in capsys.readouterr().err and not (tmp_path / "y").exists()
    # --overwrite replaces the directory once the new one is complete.
    assert convert(["hf-to-native", "--input", str(src), "--output", str(out), "--overwrite"]) == 0
    assert not (out / "keep.txt").exists() and load_model(out) is not None


def test_latest_is_followed_and_save_refuses_to_clobber(tmp_path):
    state = {"w": torch.arange(6.0).view(2, 3)}
    from megatron_qwen2.config import ModelConfig
    cfg = ModelConfig(hidden_size=32, num_layers=1, num_attention_heads=2, num_kv_heads=1, ffn_hidden_size=8,
                      vocab_size=16)
    save_native(state, cfg, tmp_path / "ckpts" / "step_000002")
    (tmp_path / "ckpts" / "latest").write_text("step_000002\n")
    loaded, loaded_cfg = load_native_state(tmp_path / "ckpts")
    assert torch.equal(loaded["w"], state["w"]) and loaded_cfg == cfg
    with pytest.raises(FileExistsError):
        save_native(state, cfg, tmp_path / "ckpts" / "step_000002")


def test_command_line_tool(tmp_path):
    src = make_hf(tmp_path / "hf", "dense", True)
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "convert_checkpoint.py"), "hf-to-native",
                             "--input", str(src), "--output", str(tmp_path / "native"), "--dtype", "bf16"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    state, _ = load_native_state(tmp_path / "native")
    assert all(t.dtype == torch.bfloat16 for t in state.values())
    assert json.loads((tmp_path / "native" / "model_config.json").read_text())["hidden_size"] == 48
