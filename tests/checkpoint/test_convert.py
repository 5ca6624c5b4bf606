"""HF <-> native conversion: bit-exact round trips, logits parity, per-expert names, bad input, the
exported tokenizer (encoding and chat template as in training), the umask's permissions."""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from megatron_qwen2.checkpoint import load_model, load_native_state, save_native  # noqa: E402
from megatron_qwen2.checkpoint.convert import main as convert, parse_size  # noqa: E402
from megatron_qwen2.checkpoint.hf_io import INDEX_FILE, read_hf_dir, write_hf_dir  # noqa: E402
from megatron_qwen2.config import ModelConfig  # noqa: E402
from megatron_qwen2.model import Qwen2Model  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DENSE = dict(vocab_size=97, hidden_size=48, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=3,
             intermediate_size=40, rope_theta=10000.0, max_position_embeddings=128)
# Layer 1 is sparse (step 2); layer 3 would be too but is listed as dense.
MOE = dict(DENSE, num_hidden_layers=4, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
           shared_expert_intermediate_size=24, decoder_sparse_step=2, mlp_only_layers=[3])
EXPERT_NAME = "model.layers.1.mlp.experts.0.gate_proj.weight"


def make_hf(path: Path, kind: str, tied: bool, dtype=torch.float32, seed=0) -> Path:
    """A tiny random HF checkpoint, saved by transformers itself."""
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


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


CASES = [("dense", True, torch.float32), ("dense", False, torch.bfloat16), ("moe", False, torch.float32),
         ("moe", True, torch.bfloat16)]


@pytest.mark.parametrize("kind,tied,dtype", CASES,
                         ids=[f"{k}-{'tied' if t else 'untied'}-{str(d)[6:]}" for k, t, d in CASES])
def test_round_trip_is_bit_exact(tmp_path, kind, tied, dtype):
    src = make_hf(tmp_path / "hf", kind, tied, dtype)
    assert convert(["hf-to-native", "--input", str(src), "--output", str(tmp_path / "native")]) == 0
    state, cfg = load_native_state(tmp_path / "native")
    assert cfg.tie_word_embeddings == tied and ("output.weight" in state) != tied
    assert all(t.dtype == dtype for t in state.values())
    # A small shard size forces several safetensors files and an index.
    assert convert(["native-to-hf", "--input", str(tmp_path / "native"), "--output", str(tmp_path / "out"),
                    "--max-shard-size", "8KiB", "--no-tokenizer"]) == 0
    index = json.loads((tmp_path / "out" / INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) > 1
    original, _ = read_hf_dir(src)
    exported, config = read_hf_dir(tmp_path / "out")
    assert config["dtype"] == config["torch_dtype"] == str(dtype)[6:]
    assert sorted(exported) == sorted(original)
    for name, t in original.items():
        assert exported[name].dtype == t.dtype and torch.equal(exported[name], t), name
    assert (EXPERT_NAME in exported) == (kind == "moe")


@pytest.mark.parametrize("kind,tied", [("dense", False), ("moe", True)])
def test_native_checkpoint_gives_hf_logits_and_exports_loadable_hf(tmp_path, kind, tied):
    src = make_hf(tmp_path / "hf", kind, tied)
    assert convert(["hf-to-native", "--input", str(src), "--output", str(tmp_path / "native")]) == 0
    assert convert(["native-to-hf", "--input", str(tmp_path / "native"), "--output", str(tmp_path / "out"),
                    "--no-tokenizer"]) == 0
    assert not (tmp_path / "out" / INDEX_FILE).exists()  # one shard under the default 5GB
    ids = torch.randint(0, DENSE["vocab_size"], (2, 19))
    model = load_model(tmp_path / "native")
    assert not model.training
    ref = transformers.AutoModelForCausalLM.from_pretrained(src).eval()
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(back) is type(ref)
    with torch.no_grad():
        expected = ref(ids).logits
        assert (model(ids) - expected).abs().max().item() <= 1e-5
        assert torch.equal(back(ids).logits, expected)


def _corrupt(src: Path, edit) -> Path:
    tensors, config = read_hf_dir(src)
    edit(tensors)
    return write_hf_dir(tensors, config, src.with_name(src.name + "-bad"), progress=False)


BAD = [(lambda t: t.pop("model.layers.1.self_attn.k_proj.bias"), "model.layers.1.self_attn.k_proj.bias"),
       (lambda t: t.update({"model.layers.0.extra.weight": torch.zeros(2)}), "model.layers.0.extra.weight"),
       (lambda t: t.update({"model.norm.weight": torch.zeros(5)}), "model.norm.weight")]


@pytest.mark.parametrize("edit,needle", BAD, ids=["missing", "extra", "misshaped"])
def test_bad_tensors_are_named_and_leave_no_output(tmp_path, capsys, edit, needle):
    bad = _corrupt(make_hf(tmp_path / "hf", "dense", False), edit)
    out = tmp_path / "native"
    assert convert(["hf-to-native", "--input", str(bad), "--output", str(out)]) == 2
    err = capsys.readouterr().err.splitlines()[-1]  # transformers' save bar may come before
    assert err.startswith("error: ") and needle in err
    assert not out.exists() and not leftovers(tmp_path)


def test_bad_native_checkpoint_leaves_existing_output_unchanged(tmp_path, capsys):
    assert convert(["hf-to-native", "--input", str(make_hf(tmp_path / "hf", "moe", False)),
                    "--output", str(tmp_path / "native")]) == 0
    cfg_file = tmp_path / "native" / "model_config.json"
    cfg_file.write_text(cfg_file.read_text().replace('"moe_ffn_hidden_size": 16', '"moe_ffn_hidden_size": 8'))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert convert(["native-to-hf", "--input", str(tmp_path / "native"), "--output", str(out), "--overwrite",
                    "--no-tokenizer"]) == 2
    assert "layers.1.mlp.experts.gate_up_weight" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and not leftovers(tmp_path)


def test_existing_output_and_bad_input_are_refused(tmp_path, capsys):
    src = make_hf(tmp_path / "hf", "dense", True)
    out = tmp_path / "native"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert convert(["hf-to-native", "--input", str(src), "--output", str(out)]) == 2
    assert f"{out} already exists" in capsys.readouterr().err and (out / "keep.txt").read_text() == "mine"
    for direction, bad_input in [("native-to-hf", src), ("hf-to-native", out), ("hf-to-native", tmp_path / "nowhere")]:
        assert convert([direction, "--input", str(bad_input), "--output", str(tmp_path / "x")]) == 2
        assert str(bad_input) in capsys.readouterr().err and not (tmp_path / "x").exists()
    # --overwrite replaces the directory once the new one is complete.
    assert convert(["hf-to-native", "--input", str(src), "--output", str(out), "--overwrite"]) == 0
    assert not (out / "keep.txt").exists() and not leftovers(tmp_path)
    # An empty directory holds nothing to clobber.
    (tmp_path / "empty").mkdir()
    assert convert(["native-to-hf", "--input", str(out), "--output", str(tmp_path / "empty"), "--no-tokenizer"]) == 0
    assert (tmp_path / "empty" / "model.safetensors").is_file()


def tiny_model_state(**overrides):
    cfg = ModelConfig(**{**dict(hidden_size=32, num_layers=1, num_attention_heads=2, num_kv_heads=1, ffn_hidden_size=8,
                                vocab_size=16), **overrides})
    torch.manual_seed(0)
    return {k: v.detach() for k, v in Qwen2Model(cfg).state_dict().items()}, cfg


def test_save_native_is_atomic_follows_latest_and_checks_names(tmp_path):
    state, cfg = tiny_model_state()
    root = tmp_path / "checkpoints"
    save_native(state, cfg, root / "step_000002")
    with pytest.raises(FileExistsError, match="step_000002"):
        save_native(state, cfg, root / "step_000002")
    newer = {k: v + 1 for k, v in state.items()}
    save_native(newer, cfg, root / "step_000002", overwrite=True)
    (root / "latest").write_text("step_000002\n")
    loaded, loaded_cfg = load_native_state(root)
    assert loaded_cfg == cfg and loaded.keys() == newer.keys()
    assert all(torch.equal(loaded[k], newer[k]) for k in newer)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_000002"]
    model = load_model(root, dtype=torch.bfloat16)
    assert model.embedding.weight.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="final_norm.weight"):
        save_native({k: v for k, v in state.items() if k != "final_norm.weight"}, cfg, root / "step_000003")
    assert not (root / "step_000003").exists() and not leftovers(root)
    with pytest.raises(ValueError, match="not a native checkpoint"):
        load_native_state(tmp_path)


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("20KiB") == 20 * 1024 and parse_size("1048576") == 2**20
    for bad in ("", "5XB", "-1", "0"):
        with pytest.raises(Exception, match="bad size"):
            parse_size(bad)


def test_command_line_tool(tmp_path):
    src = make_hf(tmp_path / "hf", "dense", True)
    # -X importtime lists every module imported: the converter must not need transformers.
    result = subprocess.run([sys.executable, "-X", "importtime", str(ROOT / "tools" / "convert_checkpoint.py"),
                             "hf-to-native", "--input", str(src), "--output", str(tmp_path / "native"),
                             "--dtype", "bf16"], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if "|" in line}
    assert "megatron_qwen2.checkpoint" in imported and "transformers" not in imported
    state, cfg = load_native_state(tmp_path / "native")
    assert cfg.hidden_size == 48 and all(t.dtype == torch.bfloat16 for t in state.values())


def sft_run_checkpoints(root: Path) -> Path:
    """A run's checkpoints/ after one SFT step with the repository tokenizer (data.tokenizer=null)."""
    from megatron_qwen2.config import Config, DataConfig, TrainConfig
    from megatron_qwen2.train import train

    cfg = Config(model=ModelConfig(hidden_size=32, num_layers=1, num_attention_heads=2, num_kv_heads=1,
                                   ffn_hidden_size=8, vocab_size=4096),
                 data=DataConfig(format="sft", paths=[str(ROOT / "tests" / "data" / "assets" / "chat.jsonl")]),
                 train=TrainConfig(steps=1, micro_batch_size=1, global_batch_size=1, seq_length=32, log_interval=100))
    train(cfg.validate(1), root / "run")
    return root / "run" / "checkpoints"


def test_native_to_hf_writes_the_run_tokenizer_and_chat_template(tmp_path, capsys):
    from megatron_qwen2.data.sft import ensure_chat_tokens, render_chat
    from megatron_qwen2.data.tokenizer import load_tokenizer

    run = sft_run_checkpoints(tmp_path)
    assert convert(["native-to-hf", "--input", str(run), "--output", str(tmp_path / "hf")]) == 0
    assert "differs from Qwen2's in its normalizer" in capsys.readouterr().err  # the repo tokenizer has no NFC
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ours = ensure_chat_tokens(load_tokenizer(None))
    text = (ROOT / "megatron_qwen2" / "checkpoint" / "hf.py").read_text()
    assert len(hf) == 4096 and hf(text)["input_ids"] == ours.encode(text).ids
    assert hf.decode(hf(text)["input_ids"]) == text
    conversations = [json.loads(line)["messages"]
                     for line in (ROOT / "tests" / "data" / "assets" / "chat.jsonl").read_text().splitlines()]
    for messages in conversations:
        ids, _ = render_chat(messages, ours)
        rendered = hf.apply_chat_template(messages, tokenize=False)
        assert rendered == ours.decode(ids.tolist(), skip_special_tokens=False)
        if not any("<|" in m["content"] for m in messages):  # SFT reads a special token typed in a message as text
            assert hf(rendered, add_special_tokens=False)["input_ids"] == ids.tolist()
    prompt = hf.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
                      "<|im_start|>assistant\n")
    assert (hf.eos_token, hf.pad_token, hf.bos_token) == ("<|im_end|>", "<|endoftext|>", None)
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    # Trained on chat: a turn ends with <|im_end|>, and generation stops at it or at <|endoftext|>.
    assert generation == {"bos_token_id": 0, "pad_token_id": 0, "eos_token_id": [2, 0]}
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (0, 2)


def test_native_to_hf_tokenizer_flag_and_its_errors(tmp_path, capsys):
    from megatron_qwen2.data.tokenizer import REPO_TOKENIZER

    state, cfg = tiny_model_state()  # vocab_size 16, no run config: no tokenizer record
    save_native(state, cfg, tmp_path / "native")
    out = tmp_path / "hf"
    assert convert(["native-to-hf", "--input", str(tmp_path / "native"), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "records no tokenizer" in err and "--tokenizer PATH" in err and not out.exists()
    assert convert(["native-to-hf", "--input", str(tmp_path / "native"), "--output", str(out),
                    "--tokenizer", str(tmp_path / "nowhere.json")]) == 2
    assert "nowhere.json" in capsys.readouterr().err and not out.exists()
    assert convert(["native-to-hf", "--input", str(tmp_path / "native"), "--output", str(out),
                    "--tokenizer", str(REPO_TOKENIZER)]) == 2
    err = capsys.readouterr().err
    assert "has 4096 tokens" in err and "vocab_size is 16" in err and not out.exists()
    big_state, big_cfg = tiny_model_state(vocab_size=4100)
    save_native(big_state, big_cfg, tmp_path / "big")
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_bytes(REPO_TOKENIZER.read_bytes())  # an HF tokenizer directory
    assert convert(["native-to-hf", "--input", str(tmp_path / "big"), "--output", str(out),
                    "--tokenizer", str(tmp_path / "tok")]) == 0
    hf = transformers.AutoTokenizer.from_pretrained(out)
    assert hf("def f(x): return 2")["input_ids"] and json.loads((out / "generation_config.json").read_text()) == {
        "bos_token_id": 0, "pad_token_id": 0, "eos_token_id": 0}  # not trained on chat: <|endoftext|> ends text


@pytest.mark.parametrize("umask,dirs,files", [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)], ids=["022", "027"])
def test_outputs_get_the_umask_permissions(tmp_path, umask, dirs, files):
    old = os.umask(umask)
    try:
        src = make_hf(tmp_path / "hf", "dense", False)
        assert convert(["hf-to-native", "--input", str(src), "--output", str(tmp_path / "native")]) == 0
        assert convert(["native-to-hf", "--input", str(tmp_path / "native"), "--output", str(tmp_path / "out"),
                        "--no-tokenizer", "--max-shard-size", "8KiB"]) == 0
    finally:
        os.umask(old)
    for root in (tmp_path / "native", tmp_path / "out"):
        paths = [root, *root.rglob("*")]
        assert len(paths) > 3
        for p in paths:
            assert stat.S_IMODE(p.stat().st_mode) == (dirs if p.is_dir() else files), p
