"""Dense -> MoE upcycling of a native checkpoint (the Qwen2 report's recipe for 57B-A14B from 7B).

Used by `tools/upcycle.py --input DENSE --output MOE --num-experts N --top-k K --expert-ffn-size F_E
--shared-expert-ffn-size F_S --reinit-fraction R --seed S [--equivalence]`.

Default recipe, per MoE layer, from the dense SwiGLU FFN of size F (neurons = rows of gate and up,
columns of down, which move together):
- routed experts: the FFN is replicated ceil(N * F_E / F) times, each replica's neurons shuffled by
  its own random permutation; the replicas are concatenated and cut into N consecutive experts of
  F_E neurons (neurons past N * F_E are unused). Then each element of each expert's gate, up and
  down weights is re-initialised ~ N(0, init_std) with probability R (so a fraction R of every
  expert's parameters, up to sampling noise of order 1/sqrt(elements));
- shared expert: the dense FFN replicated ceil(F_S / F) times, shuffled the same way and cut to F_S
  neurons (it is the dense FFN itself when F_S == F); no re-initialisation;
- router ~ N(0, router_std) (small: routing starts near uniform); shared-expert gate zero
  (sigmoid = 1/2);
- attention, norms, embedding and head are copied unchanged.
Every random draw comes from a generator seeded by (seed, layer, purpose), so the result is a
function of the seed only (not of the order of work or of the machine's threads).

Equivalence mode (`equivalence=True`, needs R = 0): the MoE model computes the dense model's function.
Settings: router weight 0, so the softmax is exactly 1/N for every expert and any top-K set has
weights 1/N; all experts identical, each the first F_E neurons of one shuffled copy of the FFN
with its down projection scaled by N / K (so the K chosen experts sum to 1 x those neurons);
shared-expert gate weight 0, so the gate is exactly sigmoid(0) = 1/2; the shared expert holds the
remaining F - F_E neurons with down scaled by 2 (1/2 x 2 = 1), its extra F_S - (F - F_E) neurons
zero. Out = FFN_A(x) + FFN_rest(x) = FFN(x), up to fp32 rounding of the sums (exact in real
arithmetic). It needs F_E <= F and F_S >= F - F_E.

Before reading the input, `upcycle_checkpoint` estimates the output's size on disk and the peak host
memory of the work (`estimate_upcycle`, from the input's config and tensor metadata) and refuses,
naming the numbers, what the output's file system or the available memory cannot hold.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import zlib
from pathlib import Path
from typing import Optional, Union

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from megatron_qwen2.checkpoint.atomic import check_paths
from megatron_qwen2.checkpoint.convert import ToolArgumentParser, run_tool
from megatron_qwen2.checkpoint.hf import expected_native_shapes
from megatron_qwen2.checkpoint.native import (MODEL_DIR, CheckpointError, check_native_state, load_model_config,
                                              load_native_state, resolve_checkpoint_dir, save_native)
from megatron_qwen2.config import ModelConfig
from megatron_qwen2.errors import ConfigError

PathLike = Union[str, Path]


@dataclasses.dataclass
class UpcycleArgs:
    num_experts: int
    top_k: int
    expert_ffn_size: int
    shared_expert_ffn_size: int
    reinit_fraction: float = 0.5
    seed: int = 0
    equivalence: bool = False
    router_std: float = 0.002


def check_args(args: UpcycleArgs, dense: ModelConfig) -> None:
    """ValueError naming the bad argument and value (and the dense size it clashes with)."""
    f = dense.ffn_hidden_size
    if dense.is_moe:
        raise ValueError(f"the input checkpoint is already an MoE model (num_experts={dense.num_experts}); "
                         "upcycling takes a dense one")
    if args.num_experts < 1:
        raise ValueError(f"--num-experts must be >= 1, got {args.num_experts}")
    if not 1 <= args.top_k <= args.num_experts:
        raise ValueError(f"--top-k must be in [1, --num-experts={args.num_experts}], got {args.top_k}")
    if args.expert_ffn_size < 1:
        raise ValueError(f"--expert-ffn-size must be >= 1, got {args.expert_ffn_size}")
    if args.expert_ffn_size > f:
        raise ValueError(f"--expert-ffn-size={args.expert_ffn_size} does not fit in the dense FFN of size {f}: "
                         "an expert is a slice of the dense FFN's neurons")
    if args.shared_expert_ffn_size < 0:
        raise ValueError(f"--shared-expert-ffn-size must be >= 0, got {args.shared_expert_ffn_size}")
    if not 0.0 <= args.reinit_fraction <= 1.0:
        raise ValueError(f"--reinit-fraction must be in [0, 1], got {args.reinit_fraction}")
    if not (math.isfinite(args.router_std) and args.router_std >= 0):
        raise ValueError(f"--router-std must be a finite number >= 0, got {args.router_std}")
    if args.equivalence:
        if args.reinit_fraction != 0:
            raise ValueError(f"--equivalence needs --reinit-fraction 0, got {args.reinit_fraction}")
        rest = f - args.expert_ffn_size
        if args.shared_expert_ffn_size < rest:
            raise ValueError(f"--equivalence: the shared expert must hold the {rest} neurons of the dense FFN "
                             f"({f}) that the experts ({args.expert_ffn_size}) do not; --shared-expert-ffn-size="
                             f"{args.shared_expert_ffn_size} is too small")


def moe_config(dense: ModelConfig, args: UpcycleArgs) -> ModelConfig:
    """The upcycled model's config: the dense one with every layer an MoE layer."""
    return dataclasses.replace(
        dense, name=f"{dense.name}_upcycled_{args.num_experts}x{args.expert_ffn_size}",
        num_experts=args.num_experts, moe_top_k=args.top_k, moe_ffn_hidden_size=args.expert_ffn_size,
        shared_expert_ffn_hidden_size=args.shared_expert_ffn_size, norm_topk_prob=False, decoder_sparse_step=1,
        mlp_only_layers=[]).validate()


def _generator(seed: int, layer: int, purpose: str) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + layer * 7919 + zlib.crc32(purpose.encode())) % 2**63)


def shuffled_neurons(ffn: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """Neuron indices [size] of the dense FFN: ceil(size / ffn) replicas, each shuffled, concatenated, cut."""
    copies = math.ceil(size / ffn)
    return torch.cat([torch.randperm(ffn, generator=gen) for _ in range(copies)])[:size]


def expert_neurons(ffn: int, args: UpcycleArgs, layer: int) -> torch.Tensor:
    """Dense-neuron index of every expert neuron [N, F_E] (the replicate-shuffle-cut of the recipe)."""
    gen = _generator(args.seed, layer, "experts")
    if args.equivalence:  # identical experts: the first F_E of one shuffled copy
        return torch.randperm(ffn, generator=gen)[:args.expert_ffn_size].expand(args.num_experts, -1)
    n = args.num_experts * args.expert_ffn_size
    return shuffled_neurons(ffn, n, gen).view(args.num_experts, args.expert_ffn_size)


def upcycle_state(state: dict[str, torch.Tensor], dense: ModelConfig, args: UpcycleArgs,
                  progress: bool = False) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """The MoE state dict and config made from a dense native state dict."""
    check_args(args, dense)
    cfg = moe_config(dense, args)
    f, fe, fs, n = dense.ffn_hidden_size, args.expert_ffn_size, args.shared_expert_ffn_size, args.num_experts
    out = {k: v for k, v in state.items() if ".mlp." not in k}  # attention, norms, embedding, head
    layers = range(dense.num_layers)
    if progress:
        from tqdm import tqdm

        layers = tqdm(layers, desc="upcycling layers", unit="layer")
    for i in layers:
        p = f"layers.{i}.mlp."
        gate_up, down = state[p + "gate_up.weight"], state[p + "down.weight"]  # [2, F, h], [h, F]
        dtype = gate_up.dtype
        idx = expert_neurons(f, args, i)  # [N, F_E]
        h = gate_up.shape[-1]
        experts_gu = gate_up.new_empty(n, 2 * fe, h)  # per expert [gate | up] rows
        experts_down = down.new_empty(n, h, fe)
        gen = _generator(args.seed, i, "reinit")
        scale = n / args.top_k if args.equivalence else 1.0
        down_rows = down.t().contiguous()  # [F, h]: a neuron's down column as a row, gathered fast
        for e in range(n):  # one expert at a time bounds the memory of the copies, masks and draws
            experts_gu[e] = gate_up[:, idx[e]].reshape(2 * fe, h)
            experts_down[e] = down_rows[idx[e]].t()
            if scale != 1.0:
                experts_down[e] *= scale
            if args.reinit_fraction > 0:
                experts_gu[e] = _reinit(experts_gu[e], args.reinit_fraction, dense.init_std, gen)
                experts_down[e] = _reinit(experts_down[e], args.reinit_fraction, dense.init_std, gen)
        out[p + "experts.gate_up_weight"] = experts_gu
        out[p + "experts.down_weight"] = experts_down
        router_gen = _generator(args.seed, i, "router")
        out[p + "router.weight"] = (torch.zeros(n, h) if args.equivalence else
                                    torch.empty(n, h).normal_(0.0, args.router_std, generator=router_gen)).to(dtype)
        if fs > 0:
            out.update({p + k: v.to(dtype) for k, v in _shared_expert(gate_up, down, idx, fs, args, i).items()})
            out[p + "shared_expert_gate.weight"] = torch.zeros(1, h, dtype=dtype)
    check_native_state(out, cfg, "upcycled state")
    return out, cfg


def _shared_expert(gate_up, down, expert_idx, fs: int, args: UpcycleArgs, layer: int) -> dict[str, torch.Tensor]:
    f = gate_up.shape[1]
    if args.equivalence:
        # The neurons the (identical) experts lack, down x 2 against the gate's 1/2; the rest zero.
        taken = torch.zeros(f, dtype=torch.bool)
        taken[expert_idx[0]] = True
        rest = torch.nonzero(~taken).squeeze(-1)
        gu = gate_up.new_zeros(2, fs, gate_up.shape[-1])
        dn = down.new_zeros(down.shape[0], fs)
        gu[:, :len(rest)] = gate_up[:, rest]
        dn[:, :len(rest)] = down[:, rest] * 2
        return {"shared_expert.gate_up.weight": gu, "shared_expert.down.weight": dn}
    idx = shuffled_neurons(f, fs, _generator(args.seed, layer, "shared"))
    return {"shared_expert.gate_up.weight": gate_up[:, idx], "shared_expert.down.weight": down[:, idx]}


def _reinit(w: torch.Tensor, fraction: float, std: float, gen: torch.Generator) -> torch.Tensor:
    """Each element replaced by a fresh N(0, std) draw with probability `fraction`."""
    mask = torch.rand(w.shape, generator=gen) < fraction
    fresh = torch.empty(w.shape).normal_(0.0, std, generator=gen).to(w.dtype)
    return torch.where(mask, fresh, w)


@dataclasses.dataclass(frozen=True)
class UpcycleCost:
    """What an upcycling needs: bytes of the output on disk and of host memory at the peak."""

    disk_bytes: int
    peak_memory_bytes: int
    dense_bytes: int  # the input's tensors, held throughout
    moe_new_bytes: int  # the MoE tensors made (experts, router, shared expert)


@dataclasses.dataclass(frozen=True)
class HostResources:
    """Free space of the output's file system and the host memory available, with where each was read."""

    disk_free_bytes: int
    disk_path: Path
    memory_available_bytes: int
    memory_source: str


def stored_tensors(ckpt_dir: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, dtype) of a native checkpoint's tensors, from its DCP metadata (no tensor read)."""
    path = ckpt_dir / MODEL_DIR
    try:
        meta = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    except Exception as e:  # unpickling a damaged file raises whatever it raises
        raise CheckpointError(f"checkpoint {ckpt_dir}: {MODEL_DIR}/ has unreadable DCP metadata "
                              f"({type(e).__name__}: {e})") from None
    return {k: (tuple(md.size), md.properties.dtype) for k, md in meta.items() if isinstance(md, TensorStorageMetadata)}


def estimate_upcycle(stored: dict[str, tuple[tuple[int, ...], torch.dtype]], dense: ModelConfig,
                     args: UpcycleArgs) -> UpcycleCost:
    """Output size and peak memory of upcycle_checkpoint, from the dense tensors' shapes and dtypes.

    The peak is at the end of the upcycling: the dense tensors (read whole), the MoE tensors made
    (attention, norms, embedding and head are shared with the dense state), and the largest
    working set of one layer: the expert neuron indices (int64, with their permutations), the
    transposed dense down projection, one expert's gathered copy and its re-initialisation draws
    (float32 draws, a bool mask, the result), and 2 % + 16 MiB for what the allocator and the
    libraries hold besides (the tensors alone come within 4 % of the measured peak on small
    models: tests/faults/test_tool_faults.py). Writing adds about 2 KB of framing per tensor on disk.
    """
    def nbytes(shape, dtype: torch.dtype) -> int:
        return math.prod(shape) * dtype.itemsize

    dense_bytes = sum(nbytes(shape, dtype) for shape, dtype in stored.values())
    dtype = stored.get("layers.0.mlp.gate_up.weight", ((), torch.float32))[1]  # the MoE tensors' dtype
    shapes = expected_native_shapes(moe_config(dense, args))
    moe_new = sum(nbytes(shape, dtype) for k, shape in shapes.items() if ".mlp." in k)
    kept = sum(nbytes(*stored.get(k, (shape, dtype))) for k, shape in shapes.items() if ".mlp." not in k)
    n, f, fe, h = args.num_experts, dense.ffn_hidden_size, args.expert_ffn_size, dense.hidden_size
    indices = 0 if args.equivalence else 2 * math.ceil(n * fe / f) * f * 8
    one_expert = 2 * fe * h
    draws = one_expert * (4 + 1 + 2 * dtype.itemsize) if args.reinit_fraction > 0 else 0
    working = indices + f * h * dtype.itemsize + one_expert * dtype.itemsize + draws
    return UpcycleCost(disk_bytes=kept + moe_new + 4096 * len(shapes) + (64 << 10),
                       peak_memory_bytes=int((dense_bytes + moe_new + working) * 1.02) + (16 << 20),
                       dense_bytes=dense_bytes, moe_new_bytes=moe_new)


def available_memory() -> tuple[int, str]:
    """Host memory this process may still use and where that was read: MemAvailable of
    /proc/meminfo, lowered by a cgroup v2 memory.max; os.sysconf's available pages elsewhere."""
    found: Optional[tuple[int, str]] = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found = (int(line.split()[1]) * 1024, "MemAvailable in /proc/meminfo")
    except (OSError, ValueError, IndexError):
        pass
    if found is None:
        found = (os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "available pages (os.sysconf)")
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            left = int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text())
            if left < found[0]:
                found = (max(left, 0), "the cgroup's memory.max less memory.current")
    except (OSError, ValueError):
        pass
    return found


def host_resources(output_dir: PathLike) -> HostResources:
    """Free disk where output_dir will be written (its nearest existing folder) and available memory."""
    where = Path(output_dir).resolve()
    while not where.exists():
        where = where.parent
    memory, source = available_memory()
    return HostResources(shutil.disk_usage(where).free, where, memory, source)


def check_fits(cost: UpcycleCost, have: HostResources, args: UpcycleArgs) -> None:
    """ConfigError naming the numbers when the output or the peak memory does not fit."""
    what = f"upcycling to {args.num_experts} experts of {args.expert_ffn_size}"
    fix = "lower --num-experts or --expert-ffn-size"
    if cost.peak_memory_bytes > have.memory_available_bytes:
        raise ConfigError(f"{what} needs about {_size(cost.peak_memory_bytes)} of host memory at its peak (the dense "
                          f"checkpoint {_size(cost.dense_bytes)} + the MoE tensors made {_size(cost.moe_new_bytes)}), "
                          f"but {_size(have.memory_available_bytes)} is available ({have.memory_source}): {fix}, "
                          "or run it on a machine with more memory")
    if cost.disk_bytes > have.disk_free_bytes:
        raise ConfigError(f"{what} writes about {_size(cost.disk_bytes)}, but the file system of {have.disk_path} has "
                          f"{_size(have.disk_free_bytes)} free: {fix}, or pick an --output with more space")


def _size(n: int) -> str:
    for unit, scale in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def upcycle_checkpoint(input_dir: PathLike, output_dir: PathLike, args: UpcycleArgs, overwrite: bool = False,
                       progress: bool = True, resources: Optional[HostResources] = None) -> Path:
    """Read a dense native checkpoint, upcycle it, write the MoE checkpoint atomically.

    Refused before the input's tensors are read: bad arguments (check_args), and a cost
    (estimate_upcycle) beyond `resources` (default: this host's, host_resources)."""
    check_paths(input_dir, output_dir, overwrite)
    ckpt_dir = resolve_checkpoint_dir(input_dir)
    dense = load_model_config(ckpt_dir)
    check_args(args, dense)
    cost = estimate_upcycle(stored_tensors(ckpt_dir), dense, args)
    check_fits(cost, resources or host_resources(output_dir), args)
    state, dense = load_native_state(ckpt_dir)  # checked against the manifest before it is read
    check_native_state(state, dense, f"checkpoint {ckpt_dir}")
    moe_state, cfg = upcycle_state(state, dense, args, progress=progress)
    return save_native(moe_state, cfg, output_dir, overwrite=overwrite)


def main(argv: Optional[list[str]] = None) -> int:
    """Run the tool; returns 0, or 2 after printing one `error: ...` line to stderr."""
    ap = ToolArgumentParser(prog="upcycle.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--input", required=True, help="dense native checkpoint directory (a run's checkpoints/ too)")
    ap.add_argument("--output", required=True, help="MoE native checkpoint directory to write")
    ap.add_argument("--num-experts", type=int, required=True)
    ap.add_argument("--top-k", type=int, required=True)
    ap.add_argument("--expert-ffn-size", type=int, required=True)
    ap.add_argument("--shared-expert-ffn-size", type=int, required=True, help="0: no shared expert")
    ap.add_argument("--reinit-fraction", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--router-std", type=float, default=0.002)
    ap.add_argument("--equivalence", action="store_true",
                    help="make the MoE model compute the dense model's function (needs --reinit-fraction 0)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    args = UpcycleArgs(num_experts=a.num_experts, top_k=a.top_k, expert_ffn_size=a.expert_ffn_size,
                       shared_expert_ffn_size=a.shared_expert_ffn_size, reinit_fraction=a.reinit_fraction,
                       seed=a.seed, equivalence=a.equivalence, router_std=a.router_std)
    return run_tool(lambda: upcycle_checkpoint(a.input, a.output, args, overwrite=a.overwrite,
                                               progress=not a.no_progress))
