"""The end-to-end throughput harness runs on the CPU (tiny model, 2 steps) and writes a complete result."""

import importlib.util
import json
import math

import pytest

from bench import train_throughput
from bench.profile_summary import CLASSES, classify, format_summary, summarise_trace

HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None


def _positive(value, what):
    assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, f"{what} = {value!r}"


def _check_row(row):
    for key in ("tokens_per_s", "step_time_s_mean", "step_time_s_median", "tflops_per_gpu", "mfu"):
        _positive(row[key], f"{row['system']}.{key}")
    assert math.isfinite(row["loss_first"]) and math.isfinite(row["loss_last"])
    assert "mem_peak_allocated_gib" in row and "mem_peak_reserved_gib" in row


@pytest.mark.parametrize("model", ["tiny", "tiny_moe"])
def test_cpu_run_writes_complete_result(tmp_path, monkeypatch, model):
    monkeypatch.setenv("MEGATRON_QWEN2_OPS", "auto")  # main() sets it for the run; restored afterwards
    out = tmp_path / "result.json"
    argv = ["--model", model, "--device", "cpu", "--seq", "32", "--mbs", "2", "--gbs", "4", "--steps", "2",
            "--warmup", "1", "--out", str(out)]
    if model == "tiny":
        argv += ["--profile", "--documents", "8"]
        if HAS_TRANSFORMERS:
            argv.append("--hf")
    assert train_throughput.main(argv) == 0
    res = json.loads(out.read_text())
    for key in ("device", "commit", "date", "config", "flops_per_token", "mfu_formula", "ceilings", "ours"):
        assert key in res, key
    assert res["config"]["micro_batches"] == 2 and res["config"]["tokens_per_step"] == 4 * 32
    _positive(res["flops_per_token"], "flops_per_token")
    _check_row(res["ours"])
    # Random tokens over the vocabulary: the loss starts near log(vocab).
    assert abs(res["ours"]["loss_first"] - math.log(res["model_config"]["vocab_size"])) < 1.0
    if model == "tiny" and HAS_TRANSFORMERS:
        (hf,) = [r for r in res["baselines"] if r["system"] == "hf_transformers"]
        _check_row(hf)
        assert abs(hf["loss_first"] - res["ours"]["loss_first"]) < 1.0
    if model == "tiny":
        (docs,) = [r for r in res["results"] if r["system"] == "megatron_qwen2_documents"]
        _check_row(docs)
        assert docs["documents_mean_tokens"] == 8 and res["config"]["documents"] == 8
        prof = res["profile"]
        assert [r["class"] for r in prof["classes"]] == list(CLASSES)
        for r in prof["classes"]:
            assert math.isfinite(r["percent"]) and r["percent"] >= 0
        assert sum(r["ms_per_step"] for r in prof["classes"]) > 0
        assert 0 < len(prof["top_kernels"]) <= 15
        by_class = {r["class"]: r["ms_per_step"] for r in prof["classes"]}
        assert by_class["GEMM"] > 0 and by_class["optimizer"] > 0
        phases = {r["phase"]: r["host_ms_per_step"] for r in prof["phases"]}
        assert {"forward_backward", "grad_finish", "optimizer"} <= set(phases)
        assert all(math.isfinite(v) and v > 0 for v in phases.values())


def test_packed_documents_cover_the_rows_with_documents_of_the_asked_lengths():
    import torch

    gen = torch.Generator().manual_seed(0)
    ids, pos = train_throughput.packed_documents(4, 4096, 64, torch.device("cpu"), gen)
    assert ids.shape == pos.shape == (4, 4096)
    assert bool((ids[:, 0] == 0).all()) and bool((ids.diff(dim=1) >= 0).all())
    new_doc = torch.cat([torch.ones(4, 1, dtype=torch.bool), ids.diff(dim=1) > 0], 1)
    assert bool((pos[new_doc] == 0).all()) and bool((pos[~new_doc] > 0).all())
    assert bool((pos.diff(dim=1)[~new_doc[:, 1:]] == 1).all())  # positions count up inside a document
    lengths = torch.cat([row.unique_consecutive(return_counts=True)[1][:-1] for row in ids])  # whole documents
    assert int(lengths.min()) >= 1 and int(lengths.max()) <= 127
    assert abs(lengths.float().mean().item() - 64) < 4


def test_bad_arguments_fail_with_the_value():
    with pytest.raises(SystemExit):
        train_throughput.parse_args(["--gbs", "3", "--mbs", "2"])
    with pytest.raises(SystemExit):
        train_throughput.parse_args(["--documents", "0"])
    with pytest.raises(ValueError, match="no_such_model"):
        train_throughput.model_config("no_such_model", None)
    with pytest.raises(ValueError, match="--layers"):
        train_throughput.model_config("qwen2_7b", 0)
    assert train_throughput.model_config("qwen2_7b", None).num_layers == 4
    assert train_throughput.model_config("qwen2_72b", 2).num_layers == 2


def test_classify_names():
    assert classify("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64") == "GEMM"
    assert classify("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT") == "GEMM"
    assert classify("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3") == "attention"
    assert classify("void ce_fwd_kernel<__nv_bfloat16, 8>(...)") == "cross-entropy/softmax"
    assert classify("void rms_fwd_fast<__nv_bfloat16>(...)") == "norm/activation/elementwise"
    assert classify("ncclDevKernel_AllReduce_Sum_f32_RING_LL") == "communication"
    assert classify("ncclDevKernel_Broadcast_RING_LL") == "communication"
    assert classify("cutlass::device_kernel<GemmUniversal<GroupProblemShape, Sm90RowBroadcast>>") == "GEMM"
    assert classify("Memcpy DtoD (Device -> Device)") == "memcpy/other"


def test_summary_counts_phases_overlap_and_idle():
    # Two kernels overlapping on two streams (busy 3 ms of a 10 ms wall), one inside the optimizer phase.
    trace = {"traceEvents": [
        {"ph": "X", "cat": "kernel", "name": "sm90_xmma_gemm", "ts": 0, "dur": 2000},
        {"ph": "X", "cat": "kernel", "name": "vectorized_elementwise_kernel", "ts": 1000, "dur": 2000},
        {"ph": "X", "cat": "gpu_user_annotation", "name": "optimizer", "ts": 2500, "dur": 1000},
        {"ph": "X", "cat": "kernel", "name": "multi_tensor_apply_kernel", "ts": 2600, "dur": 400},
    ]}
    s = summarise_trace(trace, wall_ms=10.0, steps=1)
    by = {r["class"]: r for r in s["classes"]}
    assert by["GEMM"]["ms_per_step"] == pytest.approx(2.0)
    assert by["norm/activation/elementwise"]["ms_per_step"] == pytest.approx(2.0)
    assert by["optimizer"]["ms_per_step"] == pytest.approx(0.4)
    assert s["busy_ms_per_step"] == pytest.approx(3.0)
    assert by["idle"]["ms_per_step"] == pytest.approx(7.0)
    assert by["idle"]["percent"] == pytest.approx(70.0)
    assert s["top_host"] == []  # no host events in this trace
    (phase,) = s["phases"]
    assert phase["phase"] == "optimizer"
    assert phase["device_span_ms_per_step"] == pytest.approx(1.0)
    assert phase["device_busy_ms_per_step"] == pytest.approx(0.5)  # 2500-3000: the elementwise kernel runs into it


def test_summary_ranks_host_time_by_self_time_on_a_gpu_profile():
    # An operator of 5 ms whose launch call takes 1 ms (self 4 ms), and a 3 ms synchronisation.
    trace = {"traceEvents": [
        {"ph": "X", "cat": "kernel", "name": "sm90_xmma_gemm", "ts": 0, "dur": 1000, "pid": 1, "tid": 7},
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 5000, "pid": 0, "tid": 1},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 100, "dur": 1000, "pid": 0, "tid": 1},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaStreamSynchronize", "ts": 6000, "dur": 3000, "pid": 0, "tid": 1},
    ]}
    s = summarise_trace(trace, wall_ms=10.0, steps=1)
    assert [(h["name"], h["ms_per_step"]) for h in s["top_host"]] == [
        ("aten::mm", pytest.approx(4.0)), ("cudaStreamSynchronize", pytest.approx(3.0)),
        ("cudaLaunchKernel", pytest.approx(1.0))]
    assert "cudaStreamSynchronize" in format_summary(s)
