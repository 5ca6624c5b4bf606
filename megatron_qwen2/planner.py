"""Memory and throughput planner: what one GPU holds and how long a step takes, for a layout.

Everything is computed from the same sources the training code uses: the parameters of one GPU
from its model chunks built on the meta device (`pipeline.build_model_chunks`; expert or dense by
their `Shard`, parallel/shard.py), stages from
`pipeline.stage_layers`, micro-batches in flight from `schedule.build_schedule`, FLOPs from
`model/flops.py`, the bubble from `schedule.simulate`.

Memory per GPU = model state (weights, fp32 main grads, optimizer) + the larger of two peaks:
forward/backward (activations saved per layer and micro-batch times the layer x micro-batches in
flight, pipeline messages held until the step ends, logits buffers, gradient transients) and the
optimizer step (foreach AdamW's sqrt(v) off the GPU; nothing with the fused one) + a fixed allowance for the CUDA
context and NCCL. The activation
accounting lists, tensor by tensor, what this code keeps for backward (`layer_activation_tensors`);
it is exact for tensors, not for allocator fragmentation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from megatron_qwen2.config import Config
from megatron_qwen2.engine.pipeline import build_model_chunks, stage_layers
from megatron_qwen2.engine.schedule import build_schedule, simulate, textbook_bubble_fraction
from megatron_qwen2.model.flops import fp8_flop_share, speedup_of_share, training_flops_per_token
from megatron_qwen2.ops.fp8 import WGRAD_SLICE_ELEMENTS, Fp8, Fp8Weights, recipe
from megatron_qwen2.parallel.shard import shard_of
from megatron_qwen2.parallel.topology import Topology

GiB = 1024 ** 3

# Memory torch can hand out on each GPU (total device memory as torch.cuda.mem_get_info reports it)
# and the dense bf16 peak used as the MFU denominator.
GPUS = {
    "h100-80gb": {"memory_gib": 79.1, "peak_tflops": 989.0},
    "h200-141gb": {"memory_gib": 139.8, "peak_tflops": 989.0},
}
# CUDA context, cuBLAS/cuDNN workspaces and NCCL communicator buffers: outside
# torch.cuda.max_memory_allocated, but on the device.
CONTEXT_ALLOWANCE_GIB = 3.0
# Achieved share of the 989 TFLOP/s peak, from bench/results/tp_step_tp2_micro16_h200_2026-11-23.json:
# four 72B-shaped layers at tp 2 with sequence parallelism, 16 micro-batches, 452 TFLOP/s per GPU.
DEFAULT_EFFICIENCY = 0.457
# train.fp8: the step time of the 7B-width 8-layer slice, bf16 over FP8, each measured beside the
# other in one run (bench/results/train_throughput_qwen2_7b_8layers_fp8_h100-80gb-hbm3_2026-12-07.json),
# and the share of that slice's FLOPs the FP8 GEMMs run (model/flops.py fp8_flop_share, seq
# 4096). With the rest of the step (vocabulary head, attention core, router) taken as unchanged,
# the FP8 share ran FP8_SLICE_SHARE / (1 / speed-up - 1 + FP8_SLICE_SHARE) times faster (its
# quantisation included); the planner applies that rate to the FP8 share of the model it plans.
FP8_STEP_SPEEDUP = {"tensorwise": 1.179, "rowwise": 1.131, "blockwise": 1.111}
FP8_SLICE_SHARE = 0.7378
# The MoE token exchanges (all-to-all over ep, gather / reduce-scatter over etp) are counted as
# exposed time at an assumed bandwidth per GPU, not a measured one: NVLink 4 inside a node of 8
# GPUs (450 GB/s a direction, of which an all-to-all reaches about 80 %) and one 400 Gb/s
# InfiniBand NIC per GPU across nodes (about 80 % of 50 GB/s).
GPUS_PER_NODE = 8
EXCHANGE_GBPS = {"nvlink": 360.0, "infiniband": 40.0}


def fp8_step_speedup(cfg: Config) -> float:
    """How much faster train.fp8 makes the step: the FP8 share of a dense model's FLOPs at the rate
    the 7B-width slice measured (FP8_STEP_SPEEDUP, FP8_SLICE_SHARE), the rest unchanged. A model with
    routed experts is taken at its bf16 step time: a step of one 57B-A14B-width MoE layer measures
    x0.98-0.99 of bf16's in FP8
    (bench/results/train_throughput_qwen2_57b_a14b_1layer_fp8_h100-80gb-hbm3_2026-12-07.json)."""
    if cfg.train.fp8 == "none" or cfg.model.num_experts:
        return 1.0
    rate = FP8_SLICE_SHARE / (1 / FP8_STEP_SPEEDUP[cfg.train.fp8] - 1 + FP8_SLICE_SHARE)
    return speedup_of_share(fp8_flop_share(cfg.model, cfg.train.seq_length), rate)


# ----------------------------------------------------------------------------- parameters

def stage_chunks(cfg: Config) -> list[list[torch.nn.Module]]:
    """Per pipeline rank: the model chunks one GPU of that rank holds, as `build_model_chunks` makes
    them for the layout (with train.fp8), on the meta device (shapes and shards, no memory)."""
    p = cfg.parallel
    # The parameters depend on dp only through the expert grid folded over tp x cp x dp: the
    # smallest dp that holds ep x etp gives every rank its share.
    dp = p.ep * p.etp // math.gcd(p.ep * p.etp, p.tp * p.cp)
    stage = p.tp * p.cp * dp
    rcp = recipe(cfg.train.fp8)
    fp8 = None if rcp is None else Fp8(rcp, Fp8Weights())
    out = []
    for r in range(p.pp):
        topo = Topology.plan(p, stage * p.pp, rank=r * stage)  # the first rank of stage r
        with torch.device("meta"):
            out.append(build_model_chunks(cfg.model, p, topo, fp8))
    return out


def stage_parameters(cfg: Config) -> list[list[torch.nn.Parameter]]:
    """Per pipeline rank: the parameters one GPU of that rank holds (`stage_chunks`)."""
    return [[q for chunk in chunks for q in chunk.parameters()] for chunks in stage_chunks(cfg)]


def fp8_weights(chunks: list[torch.nn.Module]) -> tuple[int, int, int, int]:
    """(elements of the dense weights whose GEMMs run in FP8, elements of the routed experts' ones,
    elements of the largest weight gradient one GEMM writes: a whole weight, or one expert's,
    elements of the largest dense FP8 weight) in `chunks`: the weights of every module that holds
    an `Fp8`."""
    weights = [w for chunk in chunks for m in chunk.modules() if getattr(m, "fp8", None) is not None
               for w in m.parameters(recurse=False) if w.dim() >= 2]
    experts = [w for w in weights if shard_of(w).is_expert]
    dense = [w for w in weights if not shard_of(w).is_expert]
    per_gemm = [w.numel() // w.shape[0] if shard_of(w).is_expert else w.numel() for w in weights]
    return (sum(w.numel() for w in dense), sum(w.numel() for w in experts), max(per_gemm, default=0),
            max((w.numel() for w in dense), default=0))


def _param_counts(params: list[torch.nn.Parameter]) -> dict[str, int]:
    expert = sum(q.numel() for q in params if shard_of(q).is_expert)
    return {"dense": sum(q.numel() for q in params) - expert, "expert": expert}


def stage_params(cfg: Config) -> list[dict[str, int]]:
    """Per pipeline rank: {'dense': n, 'expert': n} parameters on one GPU of that rank."""
    return [_param_counts(params) for params in stage_parameters(cfg)]


# ----------------------------------------------------------------------------- activations

def layer_activation_tensors(cfg: Config, moe: bool, path: str = "kernels") -> list[tuple[str, float]]:
    """(tensor, bytes) saved for backward by one decoder layer for one micro-batch, no recomputation.

    path 'kernels': CUDA with the compiled kernels and cuDNN attention (what trains on GPUs);
    'reference': the plain-PyTorch ops (CPU, or no extension), whose RMSNorm and SwiGLU keep more
    (the fp32 normalised input and its cast; silu(gate)).
    With sequence parallelism the residual stream is [s/tp, b, h], but a column-parallel linear
    saves the all-gathered [s, b, h] input it multiplied: those do not shrink with tp.
    """
    m, p, t = cfg.model, cfg.parallel, cfg.train
    a = 2 if t.dtype == "bf16" else 4
    fp8 = t.fp8 != "none"
    # A projection's input kept for its weight gradient: FP8 (1 B, transposed) with train.fp8.
    x8 = 1 if fp8 else a
    # Tokens of one micro-batch on this GPU: context parallelism cuts the sequence (its ring's
    # K/V exchange buffers are not counted).
    T = t.seq_length // p.cp * t.micro_batch_size
    tp = p.tp
    sp = tp if p.sequence_parallel_on else 1
    h, d = m.hidden_size, m.kv_channels
    nq = m.num_attention_heads // tp
    nkv = max(m.num_kv_heads // tp, 1)
    ref = path == "reference"
    out: list[tuple[str, float]] = []

    def norm(name: str) -> None:
        out.append((f"{name} input [s/sp,b,h]", a * T * h / sp))
        out.append((f"{name} 1/rms fp32", 4 * T / sp))
        if ref:  # x.float() (a new tensor only for bf16) and the normalised fp32 product
            if a != 4:
                out.append((f"{name} fp32 input copy", 4 * T * h / sp))
            out.append((f"{name} normalised fp32", 4 * T * h / sp))
            if a != 4:
                out.append((f"{name} normalised cast", a * T * h / sp))

    norm("input_norm")
    out.append(("qkv input (gathered) [s,b,h]", x8 * T * h))
    out.append(("qkv output (holds v) [s,b,(q+2kv)d]", a * T * (nq + 2 * nkv) * d))
    out.append(("q after RoPE", a * T * nq * d))
    out.append(("k after RoPE", a * T * nkv * d))
    # RoPE keeps only cos / sin (shared by every layer): its multiplications by constants need no input.
    out.append(("attention output [s,b,nq d]", a * T * nq * d))
    if fp8:  # the output projection's FP8 copy of it; in bf16 it keeps the attention's own output
        out.append(("out-projection input FP8 [s,b,nq d]", T * nq * d))
    out.append(("attention logsumexp fp32", 4 * T * nq))
    norm("post_attention_norm")
    if not moe:
        f = m.ffn_hidden_size // tp
        out.append(("gate_up input (gathered) [s,b,h]", x8 * T * h))
        out.append(("gate_up output [s,b,2f]", a * T * 2 * f))
        if ref:
            out.append(("silu(gate)", a * T * f))
        if not fp8:  # with train.fp8 the down projection remakes its FP8 input from the gate_up output
            out.append(("swiglu output = down input [s,b,f]", a * T * f))
        return out
    k, fe, e = m.moe_top_k, m.moe_ffn_hidden_size // p.etp, m.num_experts
    # Each tp rank routes its T/tp tokens; with balanced experts a rank receives T k / tp rows over
    # ep and runs its etp slice of the FFN (fe / etp) on the rows of its etp group (etp times as many).
    # With train.fp8 the permutation pads each expert's rows with zero rows to the recipe's token
    # multiple: half a multiple per expert on average, and the padding travels with the rows.
    sent = T * k / tp + (e * (recipe(t.fp8).token_multiple - 1) / 2 if fp8 else 0)
    rows = sent * p.etp
    out.append(("MoE tokens (gathered over sp) [s,b,h]", a * T * h))
    out.append(("router probs fp32 [T,E]", 4 * T * e))
    out.append(("routing ids, row map (int64), top-k weights", 28 * T * k))
    out.append(("routed rows [(T k/tp + pad) etp, h]", x8 * rows * h))
    out.append(("expert gate_up output [(T k/tp + pad) etp, 2 fe/etp]", a * rows * 2 * fe))
    if ref:
        out.append(("expert silu(gate)", a * rows * fe))
    if not fp8:  # with train.fp8 the experts' down projection remakes its FP8 input as the dense one does
        out.append(("expert swiglu output [T k etp/tp, fe/etp]", a * rows * fe))
    out.append(("expert outputs before combine [T k/tp + pad, h]", a * sent * h))
    fs = m.shared_expert_ffn_hidden_size // tp
    if fs:
        if fp8:  # its FP8 copy of the tokens; in bf16 it keeps the block's own
            out.append(("shared expert gate_up input FP8", T * h))
        out.append(("shared expert gate_up output", a * T * 2 * fs))
        if ref:
            out.append(("shared silu(gate)", a * T * fs))
        if not fp8:
            out.append(("shared swiglu output", a * T * fs))
        out.append(("shared expert output and gate", a * T * (h + 1)))
    return out


def layer_activation_bytes(cfg: Config, moe: bool, recompute: Optional[str], path: str = "kernels") -> float:
    """Bytes one layer keeps per micro-batch under `recompute` (None/'none', 'selective', 'full')."""
    tensors = layer_activation_tensors(cfg, moe, path)
    if recompute == "full":  # only the checkpoint's input, the layer input [s/sp, b, h]
        return tensors[0][1]
    if recompute == "selective":  # the attention block keeps only its input (the layer input)
        attn_end = next(i for i, (n, _) in enumerate(tensors) if n.startswith("post_attention_norm"))
        return tensors[0][1] + sum(b for _, b in tensors[attn_end:])
    return sum(b for _, b in tensors)


def chunk_activation_bytes(cfg: Config, layer_ids: list[int], path: str = "kernels") -> float:
    """Bytes one micro-batch keeps in one model chunk (its layers, with train.recompute[_num_layers])."""
    m, t = cfg.model, cfg.train
    total = 0.0
    for j, i in enumerate(layer_ids):
        on = t.recompute != "none" and (t.recompute_num_layers is None or j < t.recompute_num_layers)
        total += layer_activation_bytes(cfg, m.is_moe_layer(i), t.recompute if on else None, path)
    return total


def send_bytes(cfg: Config) -> float:
    """One pipeline message: hidden states (or their gradient) [s/sp, b, h]."""
    p, t = cfg.parallel, cfg.train
    sp = p.tp if p.sequence_parallel_on else 1
    return (2 if t.dtype == "bf16" else 4) * t.seq_length // (sp * p.cp) * t.micro_batch_size * cfg.model.hidden_size


def in_flight(cfg: Config, pp_rank: int, num_microbatches: int, chunk_bytes: list[float]) -> tuple[list[int], int]:
    """Walk this rank's schedule (`build_schedule`) and find the moment of most saved memory.

    Saved: per chunk, the micro-batches whose forward has run and backward has not (times the
    chunk's bytes per micro-batch), plus the sent messages still held: `PipelineRunner` keeps a
    sent activation until the backward of its micro-batch (the stage output, otherwise only the
    next stage's) and a sent gradient until its send completes (one in flight).
    Returns (micro-batches alive per chunk, messages held) at that moment.
    """
    p = cfg.parallel
    last = p.pp * p.vpp - 1
    live, outputs = [0] * p.vpp, 0
    best, best_at = -1.0, ([0] * p.vpp, 0)
    for a in build_schedule(p.pp, p.vpp, pp_rank, num_microbatches):
        stage = a.chunk * p.pp + pp_rank
        if a.kind == "F":
            live[a.chunk] += 1
            outputs += stage != last
            grad_in_flight = 0
        else:
            live[a.chunk] -= 1
            outputs -= stage != last
            grad_in_flight = int(stage != 0)
        held_msgs = outputs + grad_in_flight
        held = sum(n * b for n, b in zip(live, chunk_bytes)) + held_msgs * send_bytes(cfg)
        if held > best:
            best, best_at = held, (list(live), held_msgs)
    return best_at


def recompute_flops_per_token(cfg: Config) -> float:
    """Extra forward FLOPs per token that recomputation runs in backward (not model FLOPs; flops.py terms)."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    if t.recompute == "none":
        return 0.0
    h, d, s = m.hidden_size, m.kv_channels, t.seq_length
    nq, nkv = m.num_attention_heads, m.num_kv_heads
    attn = 2 * (h * (nq + 2 * nkv) * d + nq * d * h) + 2 * nq * d * s
    total = 0.0
    for ids in stage_layers(m, p):
        for j, i in enumerate(ids):
            if t.recompute_num_layers is not None and j >= t.recompute_num_layers:
                continue
            total += attn
            if t.recompute == "full":
                if m.is_moe_layer(i):
                    total += 2 * 3 * h * (m.moe_top_k * m.moe_ffn_hidden_size + m.shared_expert_ffn_hidden_size)
                    total += 2 * h * m.num_experts
                else:
                    total += 2 * 3 * h * m.ffn_hidden_size
    return total


# ----------------------------------------------------------------------------- the plan

@dataclass
class RankPlan:
    pp_rank: int
    params_dense: int
    params_expert: int
    layers: list[int]
    in_flight: list[int]  # micro-batches alive per chunk at the peak
    mem: dict[str, float] = field(default_factory=dict)  # bytes, see `_rank_memory`
    context: float = 0.0  # the fixed CUDA context / NCCL allowance, bytes

    STATE = ("weights", "main grads fp32", "optimizer (masters + Adam m, v)", "FP8 weight copies")
    BACKWARD = ("activations in flight", "pipeline messages held", "backward working set (one layer)",
                "logits / loss buffers",
                "grad transient (largest weight)")

    @property
    def params(self) -> int:
        return self.params_dense + self.params_expert

    @property
    def state(self) -> float:
        return sum(self.mem.get(k, 0.0) for k in self.STATE)

    @property
    def backward_peak(self) -> float:
        """Peak of forward/backward above the model state: activations and their transients."""
        return sum(self.mem.get(k, 0.0) for k in self.BACKWARD)

    @property
    def step_peak(self) -> float:
        """Peak of the optimizer step above the model state (activations are freed by then)."""
        return self.mem["optimizer step transient"]

    @property
    def allocated(self) -> float:
        """What torch.cuda.max_memory_allocated should report: state + the larger of the two peaks."""
        return self.state + max(self.backward_peak, self.step_peak)

    @property
    def total(self) -> float:
        return self.allocated + self.context


@dataclass
class Plan:
    cfg: Config
    world_size: int
    gpu: str
    dp: int
    num_microbatches: int
    ranks: list[RankPlan]
    flops_per_step: float
    bubble_simulated: float
    bubble_textbook: float
    efficiency: float
    step_time_s: float
    mfu: float
    recompute_flops: float = 0.0  # run in backward on top of the model FLOPs
    exchange_s: float = 0.0  # MoE token exchanges of the busiest stage per step (`moe_exchange_seconds`)

    @property
    def worst(self) -> RankPlan:
        return max(self.ranks, key=lambda r: r.total)

    @property
    def capacity_bytes(self) -> float:
        return GPUS[self.gpu]["memory_gib"] * GiB

    @property
    def fits(self) -> bool:
        return self.worst.total <= self.capacity_bytes


def _rank_memory(cfg: Config, dp: int, params: dict[str, int], largest: int, layer_ids: list[list[int]],
                 live: list[int], sends: int, is_last: bool, path: str,
                 fp8: tuple[int, int, int, int] = (0, 0, 0, 0)) -> dict[str, float]:
    """Bytes on one GPU of pipeline rank: model state, then the backward and step transients.

    largest: elements of the largest weight of the model on one GPU; fp8: `fp8_weights` of its chunks."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    bf16 = t.dtype == "bf16"
    n_dense, n_expert = params["dense"], params["expert"]
    n = n_dense + n_expert
    # The distributed optimizer shards over dp x cp (the parameters are replicated over cp too), the
    # experts over expert-dp (the tp x cp x dp ranks of a stage over ep x etp).
    shard_dense = dp * p.cp if p.distributed_optimizer else 1
    shard_expert = p.tp * p.cp * dp // (p.ep * p.etp) if p.distributed_optimizer else 1
    master_b = 4 if bf16 else 0  # fp32 masters; with fp32 params the master is the parameter itself
    opt_elems = n_dense / shard_dense + n_expert / shard_expert
    mem = {
        "weights": (2 if bf16 else 4) * n,
        "main grads fp32": 4 * n,
        "optimizer (masters + Adam m, v)": (master_b + 8) * opt_elems,
    }
    rowwise = t.fp8 == "rowwise"
    if fp8[0] or fp8[1]:  # ops/fp8.py Fp8Weights: W, and the routed experts' W^T, 1 B each
        mem["FP8 weight copies"] = fp8[0] + 2 * fp8[1]  # (scales: a few per 128 values)
    act = sum(k * chunk_activation_bytes(cfg, ids, path) for k, ids in zip(live, layer_ids))
    # Backward of a layer: its recomputed activations (when recomputing) plus gradients of the
    # same order of size live at once; one layer's full activations bound that.
    worst_layer = max((layer_activation_bytes(cfg, m.is_moe_layer(i), None, path) for ids in layer_ids for i in ids),
                      default=0.0)
    mem["activations in flight"] = act
    mem["pipeline messages held"] = sends * send_bytes(cfg)
    mem["backward working set (one layer)"] = worst_layer
    a = 2 if bf16 else 4
    T = t.seq_length // p.cp * t.micro_batch_size
    if is_last:
        v_local = m.vocab_size // p.tp
        if path == "kernels":
            # The fused cross-entropy (ops.cross_entropy) keeps the logits for backward and writes
            # their gradient in the same dtype: no fp32 copy, no softmax tensor.
            per_logit = 2 * a
        else:
            # bf16 logits + fp32 copy + shifted + exp in forward; softmax, one-hot, difference and
            # product in backward: 16 B per local logit at the peak (14 B without tp: F.cross_entropy).
            per_logit = 16 if p.tp > 1 else 14
        mem["logits / loss buffers"] = per_logit * T * v_local + a * T * m.hidden_size
    # The optimizer step (engine/distributed_optimizer.py), after the activations are freed:
    # clipping scales the main grads in place and the grad norm is per-tensor norms (small). On
    # CUDA AdamW is the fused kernel (no temporaries); the foreach AdamW of the reference path
    # (CPU) makes sqrt(v), an fp32 tensor per master (4 B x local masters).
    step_transient = 0.0 if path == "kernels" else 4 * opt_elems
    # Backward: the .grad of a weight (compute dtype) exists until the hook adds it into main_grad
    # (the largest weight of the model: conservative on stages without the embedding or head).
    # An FP8 weight gradient is accumulated into main_grad by its GEMM on CUDA (ops/fp8.py
    # add_weight_gemm); elsewhere it is an fp32 GEMM output added afterwards, slice by slice
    # (WGRAD_SLICE_ELEMENTS). Beside it, a dense W^T is made for the input gradient (1 B per element
    # of the largest dense FP8 weight; rowwise quantises W again, W and W^T: 2 B).
    fp8_wgrad = 0 if path == "kernels" else 4 * min(fp8[2], WGRAD_SLICE_ELEMENTS)
    grad_transient = max((2 if bf16 else 4) * largest, fp8_wgrad)
    grad_transient += (2 if rowwise else 1) * fp8[3]
    mem["grad transient (largest weight)"] = grad_transient
    mem["optimizer step transient"] = step_transient
    return mem


def make_plan(cfg: Config, world_size: int, gpu: str = "h100-80gb", efficiency: float = DEFAULT_EFFICIENCY,
              path: str = "kernels", context_gib: float = CONTEXT_ALLOWANCE_GIB) -> Plan:
    """The plan of a validated config on `world_size` GPUs of kind `gpu`.

    path: 'kernels' (CUDA with the compiled kernels) or 'reference' (the plain-PyTorch ops), as in
    `layer_activation_tensors`.
    """
    if gpu not in GPUS:
        raise ValueError(f"--gpu must be one of {sorted(GPUS)}, got {gpu!r}")
    if not 0 < efficiency <= 1:
        raise ValueError(f"--efficiency must be in (0, 1], got {efficiency}")
    m, p, t = cfg.model, cfg.parallel, cfg.train
    dp = world_size // (p.tp * p.pp * p.cp)
    nmb = t.global_batch_size // (t.micro_batch_size * dp)
    stages = stage_layers(m, p)
    chunks = stage_chunks(cfg)
    stage_tensors = [[q for chunk in cs for q in chunk.parameters()] for cs in chunks]
    params = [_param_counts(ps) for ps in stage_tensors]
    # The largest weight of the model on one GPU (its .grad is the backward's gradient transient).
    largest = max(q.numel() for ps in stage_tensors for q in ps)
    ranks = []
    for r in range(p.pp):
        layer_ids = [stages[c * p.pp + r] for c in range(p.vpp)]
        if p.pp > 1:
            live, sends = in_flight(cfg, r, nmb, [chunk_activation_bytes(cfg, ids, path) for ids in layer_ids])
        else:
            live, sends = [1] * p.vpp, 0
        is_last = r == p.pp - 1
        mem = _rank_memory(cfg, dp, params[r], largest, layer_ids, live, sends, is_last, path, fp8_weights(chunks[r]))
        ranks.append(RankPlan(r, params[r]["dense"], params[r]["expert"], [i for ids in layer_ids for i in ids],
                              live, mem, context_gib * GiB))
    flops = training_flops_per_token(m, t.seq_length) * t.global_batch_size * t.seq_length
    sim = simulate(p.pp, p.vpp, nmb)["bubble_fraction"] if p.pp > 1 else 0.0
    book = textbook_bubble_fraction(p.pp, p.vpp, nmb) if p.pp > 1 else 0.0
    peak = GPUS[gpu]["peak_tflops"] * 1e12
    tokens = t.global_batch_size * t.seq_length
    recompute = recompute_flops_per_token(cfg) * tokens
    compute_s = (flops + recompute) / world_size / (efficiency * peak)
    exchange = max(moe_exchange_seconds(cfg, [i for c in range(p.vpp) for i in stages[c * p.pp + r]], nmb)
                   for r in range(p.pp))
    step = compute_s / (1 - sim) / fp8_step_speedup(cfg) + exchange
    mfu = flops / world_size / step / peak
    return Plan(cfg, world_size, gpu, dp, nmb, ranks, flops, sim, book, efficiency, step, mfu, recompute, exchange)


def moe_exchange_seconds(cfg: Config, layer_ids: list[int], num_microbatches: int) -> float:
    """Seconds one GPU spends per step moving routed tokens for the MoE layers `layer_ids`.

    Per MoE layer and micro-batch a tp rank sends its T k / tp token copies (T: its cp rank's tokens)
    over ep and gets them back (the (ep-1)/ep that leave the rank), and with etp > 1 sends the rows it
    received to its etp - 1 peers and their partial outputs back; each exchange runs once in forward,
    once in backward and again in a fully recomputed layer's backward. An ep x etp block of up to
    `GPUS_PER_NODE` ranks is inside a node (NVLink), a larger one crosses nodes (InfiniBand).
    """
    m, p, t = cfg.model, cfg.parallel, cfg.train
    if not m.is_moe or p.ep * p.etp == 1:
        return 0.0
    a = 2 if t.dtype == "bf16" else 4
    copies = t.seq_length // p.cp * t.micro_batch_size * m.moe_top_k / p.tp
    per_exchange = a * m.hidden_size * copies * ((p.ep - 1) / p.ep + (p.etp - 1))  # bytes out, one way
    link = "nvlink" if p.ep * p.etp <= GPUS_PER_NODE else "infiniband"
    passes = 0
    for j, i in enumerate(layer_ids):
        if m.is_moe_layer(i):
            recomputed = t.recompute == "full" and (t.recompute_num_layers is None or j < t.recompute_num_layers)
            passes += 2 * (3 if recomputed else 2)  # there and back, forward + backward (+ recomputation)
    return passes * num_microbatches * per_exchange / (EXCHANGE_GBPS[link] * 1e9)


def _gib(x: float) -> str:
    return f"{x / GiB:7.2f} GiB"


def format_plan(plan: Plan) -> str:
    """A readable table: the most loaded rank in full, every stage in one line each."""
    cfg, p, t = plan.cfg, plan.cfg.parallel, plan.cfg.train
    w = plan.worst
    lines = [f"model {cfg.model.name}: tp {p.tp} x pp {p.pp} (vpp {p.vpp}) x dp {plan.dp} (cp {p.cp}; experts: "
             f"etp {p.etp} x ep {p.ep} x expert-dp {p.tp * p.cp * plan.dp // (p.ep * p.etp)}) "
             f"on {plan.world_size} x {plan.gpu}; seq {t.seq_length}, micro-batch {t.micro_batch_size}, "
             f"global batch {t.global_batch_size} -> {plan.num_microbatches} micro-batches per step; "
             f"{t.dtype}{'' if t.fp8 == 'none' else f' with fp8 {t.fp8}'}, recompute {t.recompute}, "
             f"distributed optimizer {p.distributed_optimizer}",
             "",
             f"most loaded GPU: pipeline rank {w.pp_rank} ({len(w.layers)} layers, "
             f"micro-batches in flight per chunk {w.in_flight})",
             f"  parameters on this GPU {w.params / 1e9:8.3f} B (dense {w.params_dense / 1e9:.3f} B, "
             f"expert {w.params_expert / 1e9:.3f} B)"]
    for k in RankPlan.STATE:
        if k in w.mem:
            lines.append(f"  {k:<40} {_gib(w.mem[k])}")
    lines.append(f"  model state{'':<29} {_gib(w.state)}")
    lines.append(f"  forward/backward, above the state:{'':<6} {_gib(w.backward_peak)}"
                 f"{'  <- peak' if w.backward_peak >= w.step_peak else ''}")
    for k in RankPlan.BACKWARD:
        if k in w.mem:
            lines.append(f"    {k:<38} {_gib(w.mem[k])}")
    lines.append(f"  optimizer step, above the state:{'':<8} {_gib(w.step_peak)}"
                 f"{'  <- peak' if w.step_peak > w.backward_peak else ''}")
    lines.append(f"  {'CUDA context / NCCL allowance':<40} {_gib(w.context)}")
    cap = plan.capacity_bytes
    lines.append(f"  {'total':<40} {_gib(w.total)}  of {_gib(cap)} usable on {plan.gpu} "
                 f"-> {'FITS' if plan.fits else 'DOES NOT FIT'} ({w.total / cap:.0%})")
    if p.pp > 1:
        lines += ["", "per stage:  rank  layers  params(B)  in flight  total"]
        for r in plan.ranks:
            lines.append(f"            {r.pp_rank:4d}  {len(r.layers):6d}  {r.params / 1e9:9.3f}  "
                         f"{str(r.in_flight):>9}  {_gib(r.total)}")
    lines += ["",
              f"model FLOPs per step {plan.flops_per_step:.3e} (model/flops.py) + recomputation "
              f"{plan.recompute_flops:.3e} (counted in the step time, not in MFU)",
              f"pipeline bubble: simulated {plan.bubble_simulated:.1%}, textbook (p-1)/(v m+p-1) "
              f"{plan.bubble_textbook:.1%}",
              f"assumed efficiency {plan.efficiency:.1%} of {GPUS[plan.gpu]['peak_tflops']:.0f} TFLOP/s"
              + ("" if t.fp8 == "none" else ", FP8 step taken as bf16's (an MoE layer measured x0.99)"
                 if plan.cfg.model.num_experts else f", FP8 step {fp8_step_speedup(plan.cfg):.2f}x faster (measured rate)")
              + ("" if not plan.exchange_s else f", + MoE token exchanges {plan.exchange_s:.2f} s (assumed bandwidth)")
              + f" -> step {plan.step_time_s:.2f} s, MFU {plan.mfu:.1%}, "
              f"{t.global_batch_size * t.seq_length / plan.step_time_s:,.0f} tokens/s"]
    return "\n".join(lines)
