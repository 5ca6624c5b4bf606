"""DPO on one process: step-1 loss and rewards against an independent computation from Hugging Face
transformers logits, ln 2 when the reference is the policy, the precomputed reference against the
frozen model, an exact resume that reuses the precomputed file, the export to Hugging Face, and bad
input (config, preference lines) stopped before the model is built."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from megatron_qwen2.config import Config, DataConfig, DpoConfig, ModelConfig, OptimConfig, TrainConfig
from megatron_qwen2.data import build_datasets, ensure_chat_tokens, load_tokenizer, render_chat
from megatron_qwen2.dpo_reference import REFERENCE_LOGPS_FILE
from megatron_qwen2.errors import ConfigError
from megatron_qwen2.train import train
from tests.parallel.runs import read_run

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
PREFERENCE = ROOT / "tests" / "data" / "assets" / "preference.jsonl"
HF = dict(vocab_size=4096, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
          intermediate_size=64, rope_theta=10000.0, max_position_embeddings=512, tie_word_embeddings=False)
MODEL = dict(hidden_size=32, num_layers=2, num_attention_heads=4, num_kv_heads=2, ffn_hidden_size=64,
             vocab_size=4096, rope_theta=10000.0, max_position_embeddings=512)
PAIRS = 8  # the global batch holds every pair of the file: step 1's means do not depend on the order


def config(run_steps: int = 1, dpo: DpoConfig = None, **train) -> Config:
    t = dict(steps=run_steps, micro_batch_size=2, global_batch_size=PAIRS, seq_length=160, log_interval=1)
    t.update(train)
    return Config(model=ModelConfig(**MODEL), optim=OptimConfig(lr=1e-3, warmup_steps=0, schedule="constant"),
                  data=DataConfig(format="preference", paths=[str(PREFERENCE)]), train=TrainConfig(**t),
                  dpo=dpo or DpoConfig()).validate(1)


def make_hf(path: Path, seed: int) -> Path:
    from megatron_qwen2.checkpoint.convert import main as convert

    torch.manual_seed(seed)
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**HF))
    with torch.no_grad():  # HF zero-initialises the biases: make every tensor matter
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(path / "hf")
    assert convert(["hf-to-native", "--input", str(path / "hf"), "--output", str(path / "native")]) == 0
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo_models")
    return make_hf(root / "policy", seed=0), make_hf(root / "reference", seed=1)


def hf_response_logps(model, tok) -> torch.Tensor:
    """[pairs, 2]: each pair's chosen and rejected response log-probabilities, each conversation run
    alone through the HF model (fp32, no packing), summed over the response's SFT-counted labels."""
    out = []
    for line in PREFERENCE.read_text().splitlines():
        rec = json.loads(line)
        as_messages = {k: ([{"role": "user" if k == "prompt" else "assistant", "content": v}]
                           if isinstance(v, str) else v) for k, v in rec.items()}
        prompt_len = len(render_chat(as_messages["prompt"], tok)[0])
        row = []
        for side in ("chosen", "rejected"):
            ids, mask = render_chat(as_messages["prompt"] + as_messages[side], tok)
            counted = torch.from_numpy(mask)
            counted[:prompt_len] = False
            ids = torch.from_numpy(ids)[None]
            with torch.no_grad():
                logp = F.log_softmax(model(ids).logits[0, :-1].double(), dim=-1)
            token_logp = logp.gather(1, ids[0, 1:, None])[:, 0]
            row.append(token_logp[counted[1:]].sum())
        out.append(torch.stack(row))
    return torch.stack(out)


@pytest.fixture(scope="module")
def hf_logps(checkpoints):
    tok = ensure_chat_tokens(load_tokenizer(None))
    policy, reference = (transformers.Qwen2ForCausalLM.from_pretrained(c / "hf", attn_implementation="eager").eval()
                         for c in checkpoints)
    return hf_response_logps(policy, tok), hf_response_logps(reference, tok)


def assert_step1_matches(step1: dict, hf_logps, dpo: DpoConfig) -> None:
    """Step 1's loss and reward means (over all the file's pairs) against those of the HF log-probabilities."""
    pi, ref = hf_logps
    logits = (pi[:, 0] - pi[:, 1]) - (ref[:, 0] - ref[:, 1])
    if dpo.loss == "sigmoid":
        eps = dpo.label_smoothing
        losses = -(1 - eps) * F.logsigmoid(dpo.beta * logits) - eps * F.logsigmoid(-dpo.beta * logits)
    else:
        losses = (logits - 1 / (2 * dpo.beta)) ** 2
    chosen, rejected = dpo.beta * (pi[:, 0] - ref[:, 0]), dpo.beta * (pi[:, 1] - ref[:, 1])
    assert abs(chosen.mean().item()) > 1e-3 and abs(rejected.mean().item()) > 1e-3  # the reference differs
    assert step1["dpo_pairs"] == PAIRS
    assert step1["loss"] == pytest.approx(losses.mean().item(), rel=1e-5)
    assert step1["dpo_chosen_reward"] == pytest.approx(chosen.mean().item(), rel=1e-5)
    assert step1["dpo_rejected_reward"] == pytest.approx(rejected.mean().item(), rel=1e-5)
    assert step1["dpo_margin"] == pytest.approx((chosen - rejected).mean().item(), rel=1e-5)
    assert step1["dpo_accuracy"] == (chosen > rejected).double().mean().item()


@pytest.mark.parametrize("dpo", [DpoConfig(), DpoConfig(beta=0.5, label_smoothing=0.2), DpoConfig(loss="ipo", beta=0.3)],
                         ids=["sigmoid", "sigmoid-smoothed", "ipo"])
def test_step1_loss_and_rewards_match_transformers(tmp_path, checkpoints, hf_logps, dpo):
    policy, reference = checkpoints
    dpo.reference = str(reference / "native")
    train(config(dpo=dpo, init_from=str(policy / "native")), tmp_path)
    assert_step1_matches(json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0]), hf_logps, dpo)


def test_packed_pairs_give_the_same_step1(tmp_path, checkpoints, hf_logps):
    """Several pairs per row (two documents each): the same losses and rewards as pairs run alone."""
    policy, reference = checkpoints
    data = DataConfig(format="preference", paths=[str(PREFERENCE)], preference_packing=True)
    rows = len(build_datasets(data, 400, TrainConfig().seed)[0])
    assert rows < PAIRS
    cfg = config(dpo=DpoConfig(reference=str(reference / "native")), init_from=str(policy / "native"),
                 seq_length=400, global_batch_size=rows, micro_batch_size=1)
    cfg.data.preference_packing = True
    train(cfg, tmp_path)
    assert_step1_matches(json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0]), hf_logps, DpoConfig())


@pytest.mark.parametrize("precompute", [False, True], ids=["frozen-model", "precomputed"])
def test_reference_equal_to_the_policy_gives_ln2(tmp_path, checkpoints, precompute):
    policy, _ = checkpoints
    train(config(dpo=DpoConfig(precompute_reference=precompute), init_from=str(policy / "native")), tmp_path)
    step1 = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    if not precompute:  # the same weights and rows through two copies of the model: the same numbers
        assert step1["loss"] == pytest.approx(math.log(2), rel=1e-12)
        assert step1["dpo_chosen_reward"] == step1["dpo_rejected_reward"] == step1["dpo_accuracy"] == 0.0
    else:  # computed with other rows beside them in a micro-batch: equal up to fp32 rounding
        assert step1["loss"] == pytest.approx(math.log(2), rel=1e-6)
        assert abs(step1["dpo_chosen_reward"]) < 1e-6 and abs(step1["dpo_rejected_reward"]) < 1e-6


def test_precomputed_reference_trains_as_the_frozen_model_and_a_resume_reuses_it(tmp_path, checkpoints, capsys):
    """Three runs of 4 steps against the reference checkpoint: the frozen model; precomputed; precomputed
    and stopped after 2 steps, then resumed."""
    policy, reference = checkpoints
    frozen, precomputed, resumed = tmp_path / "frozen", tmp_path / "pre", tmp_path / "resumed"
    common = dict(init_from=str(policy / "native"), global_batch_size=4, micro_batch_size=2, seq_length=128)
    train(config(4, DpoConfig(reference=str(reference / "native")), **common), frozen)
    train(config(4, DpoConfig(reference=str(reference / "native"), precompute_reference=True), **common), precomputed)
    train(config(2, DpoConfig(reference=str(reference / "native"), precompute_reference=True), **common), resumed)
    table = resumed / REFERENCE_LOGPS_FILE
    written = table.stat().st_mtime_ns
    capsys.readouterr()
    train(config(4, DpoConfig(reference=str(reference / "native"), precompute_reference=True), **common), resumed)
    assert f"log-probabilities read from {table}" in capsys.readouterr().out
    assert table.stat().st_mtime_ns == written
    ref_rows, ref_state = read_run(frozen)
    for run in (precomputed, resumed):
        rows, state = read_run(run)
        assert [r["step"] for r in rows] == [1, 2, 3, 4]
        for r, ref in zip(rows, ref_rows):
            # The table was computed with other rows beside each in a micro-batch: fp32 rounding apart
            # (a reward is a difference of log-probabilities ~100 times larger).
            for key in ("loss", "grad_norm", "dpo_chosen_reward", "dpo_rejected_reward"):
                assert r[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-6), (run.name, r["step"], key)
        for name in ref_state:
            torch.testing.assert_close(state[name], ref_state[name], rtol=1e-4, atol=1e-6, msg=name)
    # The resumed run is exact: the same numbers as the run that did not stop.
    rows, _ = read_run(resumed)
    pre_rows, pre_state = read_run(precomputed)
    assert [r["loss"] for r in rows] == [r["loss"] for r in pre_rows]
    assert all(torch.equal(read_run(resumed)[1][n], pre_state[n]) for n in pre_state)


def test_the_precomputed_table_from_packed_rows_equals_one_pair_per_row():
    """The precomputing pass runs the dataset's own (packed) rows: each pair's log-probabilities are those
    of the pair alone in a row (fp32 rounding apart), whichever slot of which row it had."""
    import numpy as np

    from megatron_qwen2.data.preference import PreferenceDataset, load_pairs
    from megatron_qwen2.dpo_reference import dataset_logps
    from megatron_qwen2.engine.step import TrainingStep
    from megatron_qwen2.parallel import Topology

    cfg = config(global_batch_size=2, micro_batch_size=1, seq_length=400)
    step = TrainingStep(cfg, Topology.build(cfg.parallel, 1, 0), torch.device("cpu"))
    pairs = load_pairs(PREFERENCE, ensure_chat_tokens(load_tokenizer(None)))
    packed, single = (PreferenceDataset(pairs, 400, seed=2, pad_id=0, vocab_size=4096, pack=pack)
                      for pack in (True, False))
    assert max(len(r) for r in packed.rows) > 1 and len(packed.rows) % 2 == 1  # slots, and a filled-up last batch
    got, want = dataset_logps(step, packed), dataset_logps(step, single)
    assert (want < 0).all()
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_a_dpo_run_exports_to_hugging_face(tmp_path):
    from megatron_qwen2.checkpoint import load_model
    from megatron_qwen2.checkpoint.convert import main as convert

    train(config(2, global_batch_size=2, micro_batch_size=1, seq_length=128), tmp_path / "run")
    assert convert(["native-to-hf", "--input", str(tmp_path / "run" / "checkpoints"),
                    "--output", str(tmp_path / "hf")]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False).startswith(
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>")
    ids = torch.randint(0, 4096, (2, 17))
    with torch.no_grad():
        ours = load_model(tmp_path / "run" / "checkpoints")(ids)
        assert (hf(ids).logits - ours).abs().max().item() <= 1e-5


@pytest.mark.parametrize("dpo,data,needle", [
    (dict(loss="kto"), {}, "dpo.loss must be one of sigmoid, ipo, got 'kto'"),
    (dict(beta=0.0), {}, "dpo.beta must be > 0, got 0.0"),
    (dict(label_smoothing=0.5), {}, r"dpo.label_smoothing must be in \[0, 0.5\), got 0.5"),
    (dict(loss="ipo", label_smoothing=0.1), {}, "applies to dpo.loss=sigmoid only"),
    (dict(beta=float("nan")), {}, "dpo.beta must be a finite number"),
    ({}, dict(paths=None), "data.format=preference needs data.paths"),
    ({}, dict(reset_attention_mask=True), "do not apply to data.format=preference"),
    ({}, dict(sft_packing=True), "data.sft_packing=true needs data.format=sft"),
])
def test_bad_dpo_config_is_refused(dpo, data, needle):
    cfg = Config(model=ModelConfig(**MODEL), data=DataConfig(**dict(dict(format="preference", paths=["x.jsonl"]), **data)),
                 dpo=DpoConfig(**dpo))
    with pytest.raises(ConfigError, match=needle):
        cfg.validate(1)


def test_a_malformed_line_exits_2_naming_file_and_line_before_the_model_is_built(tmp_path):
    bad = tmp_path / "pairs.jsonl"
    bad.write_text(PREFERENCE.read_text().splitlines()[0] + '\n{"prompt": "a", "chosen": "b", "rejected": " "}\n')
    proc = subprocess.run([sys.executable, "-m", "megatron_qwen2.train", "model=tiny", "data.format=preference",
                           f"data.paths=[{bad}]", f"hydra.run.dir={tmp_path / 'run'}"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == f"error: {bad}:2: the rejected response is empty"
    assert "parameters" not in proc.stdout  # stopped before the model was built


def test_a_missing_reference_stops_before_the_model_is_built(tmp_path, monkeypatch):
    from megatron_qwen2 import train as train_module
    from megatron_qwen2.train import exit_code_of

    def refuse(*args, **kwargs):
        raise AssertionError("the model was built before the reference was checked")

    monkeypatch.setattr(train_module, "TrainingStep", refuse)
    with pytest.raises(ConfigError, match=f"^checkpoint {tmp_path / 'none'} does not exist$") as err:
        train(config(dpo=DpoConfig(reference=str(tmp_path / "none"))), tmp_path / "run")
    assert exit_code_of(err.value) == 2


def test_dpo_metrics_are_grouped_in_wandb():
    from megatron_qwen2.engine.dpo import DpoMetrics
    from megatron_qwen2.metrics import wandb_name

    metrics = DpoMetrics.of(torch.tensor([1.0, -3.0, 2.0]), 4).as_metrics()
    assert metrics == {"dpo_pairs": 4, "dpo_chosen_reward": 0.25, "dpo_rejected_reward": -0.75, "dpo_margin": 1.0,
                       "dpo_accuracy": 0.5}
    assert [wandb_name(k) for k in metrics] == ["dpo/pairs", "dpo/chosen_reward", "dpo/rejected_reward",
                                                "dpo/margin", "dpo/accuracy"]


def test_response_logps_are_the_masked_sums():
    from megatron_qwen2.engine.dpo import response_logps

    token_loss = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]])
    side = torch.tensor([[0, 1, 1, 2, 0, 4, 3]])  # slot 0: chosen, rejected; slot 1: rejected, chosen
    assert response_logps(token_loss, side, 2, None).tolist() == [[[-5.0, -4.0], [-7.0, -6.0]]]
