"""Configuration dataclasses, one per concern, used as Hydra structured configs.

Every field a user may change lives here with a default that serves. `validate()` on each
raises `ConfigError` (a ValueError, exit code 2) naming the field and the bad value before
anything is allocated. `check_overrides` rejects unknown command-line keys before Hydra composes
them; `resume_differences` says which fields a resumed run changes.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from megatron_qwen2.errors import ConfigError


# data.format: pretraining token files, SFT conversations, DPO preference pairs.
DATA_FORMATS = ("pretrain", "sft", "preference")
# dpo.loss: the objectives of engine/dpo.py.
DPO_LOSSES = ("sigmoid", "ipo")

# train.fp8: the recipes of ops/fp8.py ("none": every GEMM in train.dtype).
FP8_RECIPES = ("none", "tensorwise", "rowwise", "blockwise")


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _finite(obj, prefix: str) -> None:
    """Every float field (and every float in a list field) of `obj` is a finite number."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        values = value if isinstance(value, list) else [value]
        bad = [v for v in values if isinstance(v, float) and not math.isfinite(v)]
        _require(not bad, f"{prefix}.{f.name} must be a finite number, got {value}")


def _positive(obj, *names: str, prefix: str) -> None:
    for name in names:
        value = getattr(obj, name)
        _require(isinstance(value, int) and value > 0, f"{prefix}.{name} must be a positive integer, got {value!r}")


@dataclass
class ModelConfig:
    """Architecture of a Qwen2 dense or MoE decoder (field names follow Megatron, values HF config.json)."""

    name: str = "tiny"
    hidden_size: int = 64
    num_layers: int = 2
    num_attention_heads: int = 4
    num_kv_heads: int = 2
    head_dim: Optional[int] = None  # None: hidden_size // num_attention_heads
    ffn_hidden_size: int = 128
    vocab_size: int = 4096
    max_position_embeddings: int = 32768
    rope_theta: float = 1_000_000.0
    # YaRN / linear scaling for long context; None means plain RoPE.
    rope_scaling_type: Optional[str] = None
    rope_scaling_factor: float = 1.0
    rope_original_max_position_embeddings: Optional[int] = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    qkv_bias: bool = True
    init_std: float = 0.02
    # Mixture of experts (num_experts == 0: dense model).
    num_experts: int = 0
    moe_top_k: int = 0
    moe_ffn_hidden_size: int = 0
    shared_expert_ffn_hidden_size: int = 0
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    aux_loss_coef: float = 0.001
    moe_z_loss_coef: float = 0.0  # router z-loss (0: off)
    moe_capacity_factor: Optional[float] = None  # per-expert token capacity factor with dropping (None: dropless)

    @property
    def kv_channels(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_attention_heads

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Same rule as HF Qwen2MoeDecoderLayer."""
        return (
            self.num_experts > 0
            and layer_idx not in self.mlp_only_layers
            and (layer_idx + 1) % self.decoder_sparse_step == 0
        )

    def validate(self) -> "ModelConfig":
        p = "model"
        _finite(self, p)
        _positive(self, "hidden_size", "num_layers", "num_attention_heads", "num_kv_heads",
                  "ffn_hidden_size", "vocab_size", "max_position_embeddings", prefix=p)
        _require(self.num_attention_heads % self.num_kv_heads == 0,
                 f"model.num_attention_heads={self.num_attention_heads} is not divisible by "
                 f"model.num_kv_heads={self.num_kv_heads}")
        if self.head_dim is None:
            _require(self.hidden_size % self.num_attention_heads == 0,
                     f"model.hidden_size={self.hidden_size} is not divisible by "
                     f"model.num_attention_heads={self.num_attention_heads}; set model.head_dim")
        else:
            _positive(self, "head_dim", prefix=p)
        _require(self.kv_channels % 2 == 0, f"model.head_dim={self.kv_channels} must be even for RoPE")
        _require(self.rope_theta > 0, f"model.rope_theta must be > 0, got {self.rope_theta}")
        _require(self.rms_norm_eps > 0, f"model.rms_norm_eps must be > 0, got {self.rms_norm_eps}")
        _require(self.init_std > 0, f"model.init_std must be > 0, got {self.init_std}")
        _require(self.rope_scaling_type in (None, "yarn", "linear"),
                 f"model.rope_scaling_type must be null, 'yarn' or 'linear', got {self.rope_scaling_type!r}")
        if self.rope_scaling_type is not None:
            _require(self.rope_scaling_factor >= 1.0,
                     f"model.rope_scaling_factor must be >= 1, got {self.rope_scaling_factor}")
        _require(self.num_experts >= 0, f"model.num_experts must be >= 0, got {self.num_experts}")
        if self.num_experts > 0:
            _positive(self, "moe_top_k", "moe_ffn_hidden_size", "decoder_sparse_step", prefix=p)
            _require(self.moe_top_k <= self.num_experts,
                     f"model.moe_top_k={self.moe_top_k} exceeds model.num_experts={self.num_experts}")
            _require(self.shared_expert_ffn_hidden_size >= 0,
                     f"model.shared_expert_ffn_hidden_size must be >= 0, got {self.shared_expert_ffn_hidden_size}")
            _require(self.aux_loss_coef >= 0, f"model.aux_loss_coef must be >= 0, got {self.aux_loss_coef}")
            _require(self.moe_z_loss_coef >= 0, f"model.moe_z_loss_coef must be >= 0, got {self.moe_z_loss_coef}")
            _require(self.moe_capacity_factor is None or self.moe_capacity_factor > 0,
                     f"model.moe_capacity_factor must be > 0 or null, got {self.moe_capacity_factor}")
            bad = [i for i in self.mlp_only_layers if not 0 <= i < self.num_layers]
            _require(not bad, f"model.mlp_only_layers has indices outside [0, {self.num_layers}): {bad}")
        return self


@dataclass
class ParallelConfig:
    """Parallel degrees; dp is derived from the world size."""

    tp: int = 1
    pp: int = 1
    vpp: int = 1
    cp: int = 1
    ep: int = 1  # experts split over ep ranks of the tp x cp x dp ranks of a stage (folded: topology.py)
    etp: int = 1  # expert-tensor parallel: each expert's FFN split over etp ranks
    sequence_parallel: Optional[bool] = None  # None: on when tp > 1
    pp_layout: Optional[list[int]] = None  # layers per pipeline stage (None: even split)
    distributed_optimizer: bool = False  # shard fp32 masters and Adam state over dp (ZeRO-1)
    overlap_grad_reduce: bool = True  # reduce gradient buckets during backward
    bucket_size: int = 40_000_000  # elements per gradient bucket

    @property
    def sequence_parallel_on(self) -> bool:
        """Whether sequence parallelism runs: asked for (or left unset) and tp > 1. The one place that decides."""
        return self.tp > 1 and self.sequence_parallel is not False

    def layer_counts(self, num_layers: int) -> list[int]:
        """Decoder layers of each virtual pipeline stage (pp * vpp of them, in pipeline order)."""
        stages = self.pp * self.vpp
        if self.pp_layout is not None:
            counts = list(self.pp_layout)
            _require(len(counts) == stages and all(c >= 0 for c in counts) and sum(counts) == num_layers,
                     f"parallel.pp_layout={counts} must give {stages} non-negative layer counts "
                     f"(pp={self.pp} x vpp={self.vpp}) summing to model.num_layers={num_layers}")
            return counts
        _require(num_layers % stages == 0,
                 f"model.num_layers={num_layers} is not divisible by pp*vpp={self.pp}*{self.vpp}; "
                 "set parallel.pp_layout to choose the layers of each stage")
        return [num_layers // stages] * stages

    def validate(self) -> "ParallelConfig":
        _positive(self, "tp", "pp", "vpp", "cp", "ep", "etp", "bucket_size", prefix="parallel")
        self.sequence_parallel = self.sequence_parallel_on
        return self


def check_microbatches(pp: int, vpp: int, num_microbatches: int) -> None:
    """The interleaved schedule runs micro-batches through the chunks in groups of pp."""
    _require(vpp == 1 or num_microbatches % pp == 0,
             f"interleaved pipeline (parallel.vpp={vpp}) needs the number of micro-batches per "
             f"data-parallel rank ({num_microbatches}) to be a multiple of parallel.pp={pp}")


@dataclass
class OptimConfig:
    """AdamW and the learning-rate schedule (Qwen2 report defaults)."""

    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_grad: float = 1.0
    warmup_steps: int = 10
    schedule: str = "cosine"  # cosine | constant | linear
    decay_steps: Optional[int] = None  # None: train.steps - warmup_steps

    def validate(self) -> "OptimConfig":
        _finite(self, "optim")
        _require(self.lr > 0, f"optim.lr must be > 0, got {self.lr}")
        _require(0 <= self.min_lr_ratio <= 1, f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        for name in ("beta1", "beta2"):
            v = getattr(self, name)
            _require(0 <= v < 1, f"optim.{name} must be in [0, 1), got {v}")
        _require(self.eps > 0, f"optim.eps must be > 0, got {self.eps}")
        _require(self.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        _require(self.clip_grad >= 0, f"optim.clip_grad must be >= 0 (0 disables), got {self.clip_grad}")
        _require(self.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        _require(self.schedule in ("cosine", "constant", "linear"),
                 f"optim.schedule must be 'cosine', 'constant' or 'linear', got {self.schedule!r}")
        if self.decay_steps is not None:
            _require(self.decay_steps > 0, f"optim.decay_steps must be > 0, got {self.decay_steps}")
        return self


@dataclass
class DataConfig:
    """Training corpus and tokenizer."""

    corpus: str = "stdlib"  # 'stdlib': the Python standard library's source, or a path/glob of text files
    tokenizer: Optional[str] = None  # tokenizer.json or a directory holding one; None: the repo's tokenizer
    cache_dir: Optional[str] = None  # where tokenised corpora are cached; None: ~/.cache/megatron_qwen2
    max_files: Optional[int] = None  # cap on the number of corpus files (None: all)
    # Datasets instead of the corpus: [prefix, ...], [w1, prefix1, w2, prefix2, ...] or [{path, weight}, ...].
    # format 'pretrain': .bin/.idx prefixes (tools/preprocess_data.py); 'sft': chat jsonl files;
    # 'preference': preference pairs in jsonl (data/preference.py), trained with DPO (DpoConfig).
    paths: Optional[list[Any]] = None
    format: str = "pretrain"  # pretrain | sft | preference
    split: list[float] = field(default_factory=lambda: [1.0, 0.0])  # train, valid weights (by document)
    reset_position_ids: bool = False  # positions restart at 0 at each document inside a sample
    reset_attention_mask: bool = False  # attention stays inside each document (block-diagonal causal mask)
    eod_mask_loss: bool = False  # no loss on the label after an end-of-document token or a document's last token
    # data.format=sft: pack several conversations per row (each attends within itself, positions
    # restart per conversation) instead of one padded conversation per row.
    sft_packing: bool = False
    # data.format=preference: pack several whole pairs per row (two documents each) instead of one per row.
    preference_packing: bool = False

    def validate(self) -> "DataConfig":
        _finite(self, "data")
        _require(bool(self.corpus), "data.corpus must name 'stdlib' or a path/glob of text files")
        if self.max_files is not None:
            _require(self.max_files > 0, f"data.max_files must be > 0, got {self.max_files}")
        _require(self.format in DATA_FORMATS,
                 f"data.format must be one of {', '.join(DATA_FORMATS)}, got {self.format!r}")
        _require(len(self.split) == 2 and all(w >= 0 for w in self.split) and self.split[0] > 0,
                 f"data.split must be [train, valid] weights, train > 0 and valid >= 0, got {list(self.split)}")
        if self.paths is not None:
            from megatron_qwen2.data.builder import parse_data_paths  # the one parser of the accepted forms

            parse_data_paths(self.paths)
        _require(self.format != "sft" or self.paths is not None,
                 "data.format=sft needs data.paths naming chat jsonl files")
        _require(self.format != "preference" or self.paths is not None,
                 "data.format=preference needs data.paths naming preference jsonl files "
                 '(lines {"prompt": ..., "chosen": ..., "rejected": ...})')
        if self.format == "sft":
            _require(not (self.reset_position_ids or self.reset_attention_mask or self.eod_mask_loss),
                     "data.reset_position_ids / reset_attention_mask / eod_mask_loss do not apply to data.format=sft "
                     "(loss on assistant turns; with data.sft_packing=true every conversation of a row attends "
                     "within itself and its positions restart)")
        if self.format == "preference":
            _require(not (self.reset_position_ids or self.reset_attention_mask or self.eod_mask_loss),
                     "data.reset_position_ids / reset_attention_mask / eod_mask_loss do not apply to "
                     "data.format=preference (a row holds one pair: chosen and rejected each attend within "
                     "themselves and their positions restart)")
        _require(self.format == "sft" or not self.sft_packing,
                 f"data.sft_packing=true needs data.format=sft, got data.format={self.format!r}")
        _require(self.format == "preference" or not self.preference_packing,
                 f"data.preference_packing=true needs data.format=preference, got data.format={self.format!r}")
        return self


@dataclass
class TrainConfig:
    """The training loop: batch geometry, steps, precision, logging."""

    steps: int = 200
    seed: int = 1234
    micro_batch_size: int = 4
    global_batch_size: int = 8
    seq_length: int = 128
    dtype: str = "fp32"  # fp32 | bf16 (compute dtype; master weights stay fp32)
    log_interval: int = 10
    save_interval: int = 0  # 0: no periodic checkpoints (the last step, and a preemption, still save)
    keep_last: int = 3  # keep this many newest checkpoints in run_dir/checkpoints (0: all)
    async_save: bool = False  # periodic saves write in a background thread (the loop waits for a CPU copy only)
    # true: continue from run_dir/checkpoints/latest when there is one, refusing a checkpoint whose
    # model, data or batch fields differ (RESUME_MUST_MATCH); force: continue even then; false: start afresh.
    resume: Union[bool, str] = True
    init_from: Optional[str] = None  # weights only (fresh optimizer) from a native/HF-converted checkpoint
    on_nonfinite: str = "skip"  # NaN/Inf loss or grad norm: skip the update, or stop (exit code 3)
    max_skipped_steps: int = 10  # on_nonfinite=skip: more consecutive skipped updates than this stop the run (exit 3)
    loss_spike_factor: float = 3.0  # warn when a loss exceeds this x the running median of recent losses (0: off)
    eval_interval: int = 0  # validation loss every N steps (0: never)
    eval_iters: int = 10  # global batches per validation
    # none | tensorwise | rowwise | blockwise: the attention and MLP projections (routed experts
    # included) run their forward, input-gradient and weight-gradient GEMMs in FP8 (ops/fp8.py), with
    # outputs in train.dtype; on a GPU of compute capability 9.0+, emulated on the CPU.
    fp8: str = "none"
    recompute: str = "none"  # activation recomputation: none | selective (attention block) | full (layer)
    recompute_num_layers: Optional[int] = None  # recompute the first N layers of each model chunk (None: all)
    peak_tflops: Optional[float] = None  # per-device peak for MFU; None: known GPUs' bf16 dense peak
    # Hang watchdog (megatron_qwen2/watchdog.py): no step completed within this many minutes (the first
    # step of a process: 3x) -> stacks to run_dir/hang/, exit code 76 (requeued). 0: off.
    hang_timeout_min: float = 30

    def validate(self) -> "TrainConfig":
        _finite(self, "train")
        _positive(self, "steps", "micro_batch_size", "global_batch_size", "seq_length", "log_interval",
                  "eval_iters", prefix="train")
        _require(isinstance(self.resume, bool) or self.resume == "force",
                 f"train.resume must be true, false or force, got {self.resume!r}")
        _require(isinstance(self.max_skipped_steps, int) and self.max_skipped_steps >= 1,
                 f"train.max_skipped_steps must be an integer >= 1 (consecutive skipped updates before the run "
                 f"stops; train.on_nonfinite=stop stops at the first), got {self.max_skipped_steps!r}")
        _require(self.loss_spike_factor == 0 or self.loss_spike_factor > 1,
                 f"train.loss_spike_factor must be 0 (off) or > 1, got {self.loss_spike_factor}")
        _require(self.save_interval >= 0, f"train.save_interval must be >= 0, got {self.save_interval}")
        _require(self.keep_last >= 0, f"train.keep_last must be >= 0 (0 keeps all), got {self.keep_last}")
        _require(self.eval_interval >= 0, f"train.eval_interval must be >= 0, got {self.eval_interval}")
        _require(self.on_nonfinite in ("skip", "stop"),
                 f"train.on_nonfinite must be 'skip' or 'stop', got {self.on_nonfinite!r}")
        _require(self.recompute in ("none", "selective", "full"),
                 f"train.recompute must be 'none', 'selective' or 'full', got {self.recompute!r}")
        if self.recompute_num_layers is not None:
            _require(self.recompute_num_layers >= 0,
                     f"train.recompute_num_layers must be >= 0 or null, got {self.recompute_num_layers}")
        if self.peak_tflops is not None:
            _require(self.peak_tflops > 0, f"train.peak_tflops must be > 0 or null, got {self.peak_tflops}")
        _require(self.hang_timeout_min >= 0,
                 f"train.hang_timeout_min must be >= 0 (0 turns the hang watchdog off), got {self.hang_timeout_min}")
        _require(self.dtype in ("fp32", "bf16"), f"train.dtype must be 'fp32' or 'bf16', got {self.dtype!r}")
        _require(self.fp8 in FP8_RECIPES, f"train.fp8 must be one of {', '.join(FP8_RECIPES)}, got {self.fp8!r}")
        return self


@dataclass
class DpoConfig:
    """Direct preference optimisation (data.format=preference; engine/dpo.py, docs/architecture.md "DPO")."""

    # The frozen reference: a native checkpoint directory (or its checkpoints/ with `latest`);
    # None: the weights the policy starts from (train.init_from, else the seeded initialisation).
    reference: Optional[str] = None
    # true: the reference's log-probabilities are computed once, in one forward-only pass before
    # training, and kept in RUN_DIR/dpo_reference_logps.pt, so training holds one model.
    precompute_reference: bool = False
    loss: str = "sigmoid"  # sigmoid (DPO) | ipo
    beta: float = 0.1  # the KL weight: rewards are beta * (log pi - log pi_ref)
    label_smoothing: float = 0.0  # sigmoid only: the probability that a pair's preference is flipped (cDPO)

    def validate(self) -> "DpoConfig":
        _finite(self, "dpo")
        _require(self.loss in DPO_LOSSES, f"dpo.loss must be one of {', '.join(DPO_LOSSES)}, got {self.loss!r}")
        _require(self.beta > 0, f"dpo.beta must be > 0, got {self.beta}")
        _require(0 <= self.label_smoothing < 0.5,
                 f"dpo.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        _require(self.loss == "sigmoid" or self.label_smoothing == 0,
                 f"dpo.label_smoothing={self.label_smoothing} applies to dpo.loss=sigmoid only; "
                 f"set it to 0 for dpo.loss={self.loss}")
        _require(self.reference is None or bool(str(self.reference)),
                 "dpo.reference must name a checkpoint directory or be null")
        return self


@dataclass
class WandbConfig:
    """wandb logging; offline unless WANDB_API_KEY is set or mode says otherwise."""

    enabled: bool = False
    project: str = "megatron_qwen2"
    mode: Optional[str] = None  # None: 'online' if WANDB_API_KEY is set, else 'offline'


@dataclass
class Config:
    """The whole run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dpo: DpoConfig = field(default_factory=DpoConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    device: str = "cpu"

    @property
    def is_dpo(self) -> bool:
        """Preference data trains with the DPO objective; every other format with the token loss."""
        return self.data.format == "preference"

    def validate(self, world_size: int = 1) -> "Config":
        self.model.validate()
        self.parallel.validate()
        self.optim.validate()
        self.data.validate()
        self.train.validate()
        self.dpo.validate()
        _require(self.device in ("cpu", "cuda"), f"device must be 'cpu' or 'cuda', got {self.device!r}")
        if self.model.tie_word_embeddings is None:
            raise ValueError("model.tie_word_embeddings must be true or false")
        p, t = self.parallel, self.train
        model_parallel = p.tp * p.pp * p.cp
        _require(world_size % model_parallel == 0,
                 f"world size {world_size} is not divisible by tp*pp*cp = {p.tp}*{p.pp}*{p.cp} = {model_parallel}")
        dp = world_size // model_parallel
        m = self.model
        tp_split = [("num_attention_heads", m.num_attention_heads), ("ffn_hidden_size", m.ffn_hidden_size),
                    ("vocab_size", m.vocab_size)]
        if m.is_moe and m.shared_expert_ffn_hidden_size > 0:
            tp_split.append(("shared_expert_ffn_hidden_size", m.shared_expert_ffn_hidden_size))
        for name, value in tp_split:
            _require(value % p.tp == 0, f"model.{name}={value} is not divisible by parallel.tp={p.tp}")
        # More tp ranks than kv heads: each kv head is replicated on tp / num_kv_heads ranks.
        _require(m.num_kv_heads % p.tp == 0 or p.tp % m.num_kv_heads == 0,
                 f"model.num_kv_heads={m.num_kv_heads} and parallel.tp={p.tp}: one must divide the other")
        if p.cp > 1:
            _require(t.seq_length % (2 * p.cp) == 0,
                     f"train.seq_length={t.seq_length} is not divisible by 2*parallel.cp = {2 * p.cp} "
                     "(context parallelism cuts each sequence into 2*cp chunks, two per cp rank)")
        if p.sequence_parallel_on:
            _require((t.seq_length // p.cp) % p.tp == 0,
                     f"train.seq_length={t.seq_length} / parallel.cp={p.cp} = {t.seq_length // p.cp} tokens per cp "
                     f"rank is not divisible by parallel.tp={p.tp} (sequence parallelism cuts them across tp ranks)"
                     if p.cp > 1 else
                     f"train.seq_length={t.seq_length} is not divisible by parallel.tp={p.tp} "
                     "(sequence parallelism cuts the sequence across tp ranks)")
        p.layer_counts(m.num_layers)
        self._validate_expert_layout(dp)
        # global = micro x accumulation x dp: the accumulation steps are derived, and must be whole.
        _require(t.global_batch_size % (t.micro_batch_size * dp) == 0,
                 f"train.global_batch_size={t.global_batch_size} is not divisible by "
                 f"train.micro_batch_size={t.micro_batch_size} x dp={dp} (global = micro x accumulation x dp; "
                 f"dp = world size {world_size} / (tp*pp*cp) = {dp})")
        check_microbatches(p.pp, p.vpp, t.global_batch_size // (t.micro_batch_size * dp))
        if t.fp8 != "none":
            self._validate_fp8()
        return self

    def _validate_expert_layout(self, dp: int) -> None:
        """The expert grid (etp x ep x expert-dp) folds over the tp x cp x dp ranks of a stage."""
        m, p, t = self.model, self.parallel, self.train
        stage = p.tp * p.cp * dp
        _require(stage % (p.ep * p.etp) == 0,
                 f"parallel.ep={p.ep} x parallel.etp={p.etp} = {p.ep * p.etp} does not divide the {stage} ranks of a "
                 f"pipeline stage, tp*cp*dp = {p.tp}*{p.cp}*{dp} (the expert grid folds over them); choose ep and "
                 f"etp whose product divides {stage}")
        if not m.is_moe:
            return
        _require(m.num_experts % p.ep == 0,
                 f"model.num_experts={m.num_experts} is not divisible by parallel.ep={p.ep}")
        _require(m.moe_ffn_hidden_size % p.etp == 0,
                 f"model.moe_ffn_hidden_size={m.moe_ffn_hidden_size} is not divisible by parallel.etp={p.etp}")
        tokens = t.seq_length // p.cp * t.micro_batch_size
        _require(p.tp == 1 or tokens % p.tp == 0,
                 f"train.seq_length/parallel.cp x train.micro_batch_size = {tokens} tokens per micro-batch and cp rank "
                 f"are not divisible by parallel.tp={p.tp} (each tp rank routes its share of them to the experts)")

    def fp8_gemm_dims(self) -> list[tuple[str, int]]:
        """(name, size) of every K and N the FP8 GEMMs of one rank see: the projections' local
        input and output features."""
        m, tp = self.model, self.parallel.tp
        d, nq, nkv = m.kv_channels, m.num_attention_heads, m.num_kv_heads
        qkv_rows = (nq // tp + 2 * max(nkv // tp, 1)) * d
        dims = [("model.hidden_size", m.hidden_size), ("the QKV projection's rows per tp rank", qkv_rows),
                ("the attention output's features per tp rank (heads x kv_channels / tp)", nq * d // tp)]
        dense = [i for i in range(m.num_layers) if not m.is_moe_layer(i)]
        if dense:
            dims.append(("model.ffn_hidden_size / parallel.tp", m.ffn_hidden_size // tp))
        if m.is_moe:
            dims.append(("model.moe_ffn_hidden_size / parallel.etp", m.moe_ffn_hidden_size // self.parallel.etp))
            if m.shared_expert_ffn_hidden_size > 0:
                dims.append(("model.shared_expert_ffn_hidden_size / parallel.tp", m.shared_expert_ffn_hidden_size // tp))
        return dims

    def _validate_fp8(self) -> None:
        for name, size in self.fp8_gemm_dims():
            _require(size % 16 == 0,
                     f"train.fp8={self.train.fp8}: {name} = {size} is not a multiple of 16 (the FP8 GEMMs need "
                     f"every dimension to be one); choose a parallel.tp that keeps it one, or train.fp8=none")


def resolve_config(cfg, world_size: int | None = None) -> Config:
    """Merge a composed Hydra/OmegaConf config onto the typed schema and validate it.

    Unknown keys and values of the wrong type fail in OmegaConf (naming the full key);
    out-of-range values fail in `validate` with a ConfigError naming field and value.
    """
    import os

    from omegaconf import OmegaConf

    merged = OmegaConf.merge(OmegaConf.structured(Config), cfg)
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    return OmegaConf.to_object(merged).validate(world_size)


# ---------------------------------------------------------------------------------------------
# Resuming: which fields a checkpoint and the run that continues it must share

# Fields that define the model, the data order, the batch or the DPO objective: a run may continue a checkpoint only
# when they are equal (train.resume=force overrides). Patterns over dotted names; RESUME_MAY_CHANGE
# lists the exceptions. Every other field (steps, intervals, logging, eval, checkpointing, the
# optimizer, precision, the parallel layout, wandb) may change on resume.
RESUME_MUST_MATCH = ("model.*", "data.*", "train.seq_length", "train.micro_batch_size", "train.global_batch_size",
                     "train.seed", "dpo.*")
RESUME_MAY_CHANGE = ("model.name", "data.cache_dir")


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def must_match_on_resume(name: str) -> bool:
    """True for a dotted field name that a resumed run must share with its checkpoint."""
    return (any(fnmatch.fnmatchcase(name, p) for p in RESUME_MUST_MATCH)
            and not any(fnmatch.fnmatchcase(name, p) for p in RESUME_MAY_CHANGE))


def resume_differences(old: dict, new: dict) -> tuple[dict[str, tuple], dict[str, tuple]]:
    """Compare a checkpoint's run config with the config resuming it (both `dataclasses.asdict(Config)`).

    Returns (blocking, allowed): {dotted name: (old value, new value)} for the fields that differ,
    split by `must_match_on_resume`. Values are compared as JSON (the checkpoint's config.json), and
    a field only one side has (a checkpoint older than the field) is not compared.
    """
    old_flat, new_flat = _flatten(old), _flatten(json.loads(json.dumps(new)))
    blocking: dict[str, tuple] = {}
    allowed: dict[str, tuple] = {}
    for name in sorted(old_flat.keys() & new_flat.keys()):
        if old_flat[name] != new_flat[name]:
            (blocking if must_match_on_resume(name) else allowed)[name] = (old_flat[name], new_flat[name])
    return blocking, allowed


def format_differences(differences: dict[str, tuple]) -> str:
    """`name: old -> new, ...` for the result of `resume_differences`."""

    def show(value) -> str:
        return value if isinstance(value, str) else json.dumps(value)

    return ", ".join(f"{name}: {show(old)} -> {show(new)}" for name, (old, new) in differences.items())


# ---------------------------------------------------------------------------------------------
# Command-line overrides

def config_field_names(schema=Config, prefix: str = "") -> list[str]:
    """Every dotted field name of the config schema (`model.hidden_size`, ..., `device`)."""
    names = []
    for f in dataclasses.fields(schema):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            names += config_field_names(type(default), f"{prefix}{f.name}.")
        else:
            names.append(f"{prefix}{f.name}")
    return names


def check_overrides(args: list[str], conf_dir: Path) -> None:
    """Reject command-line overrides naming a field the schema lacks, or a config group option
    that conf/ lacks, with one ConfigError naming it and the closest valid ones.

    `hydra.*` keys and flags (`--cfg`, `-m`, ...) are left to Hydra; `+` / `++` / `~` prefixes
    are checked like plain keys.
    """
    fields = config_field_names()
    groups = sorted(p.name for p in Path(conf_dir).iterdir() if p.is_dir())
    for arg in args:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        key = key.lstrip("+~").split("@", 1)[0]
        if key == "hydra" or key.startswith("hydra."):
            continue
        if key in groups:
            options = sorted(p.stem for p in (Path(conf_dir) / key).glob("*.yaml"))
            _require(value in options,
                     f"unknown {key}={value}: conf/{key}/ holds {', '.join(options)}")
            continue
        # Lists and dicts (data.paths, parallel.pp_layout, ...) end the walk: their items are values.
        if key in fields or any(key.startswith(name + ".") for name in fields):
            continue
        raise ConfigError(f"unknown config key {key} (in {arg!r}); {_closest_keys(key, fields)}")


def _closest_keys(key: str, fields: list[str]) -> str:
    """The closest valid names to an unknown dotted key: its section's first, else any."""
    section = key.rpartition(".")[0]
    siblings = [name for name in fields if name.rpartition(".")[0] == section]
    close = difflib.get_close_matches(key, siblings, n=3, cutoff=0.6) or difflib.get_close_matches(key, fields, n=3)
    if close:
        return "the closest valid keys are " + ", ".join(close)
    if section and siblings:
        return f"{section} has " + ", ".join(name.rpartition(".")[2] for name in siblings)
    return "every field is listed in megatron_qwen2/config.py"
