"""Baseline training steps for bench/train_throughput.py: Hugging Face transformers and Megatron-Core.

Each baseline is built from our ModelConfig, fed the same random token batches (gbs rows of seq
tokens, cut into micro-batches of mbs), and runs forward, backward with gradient accumulation,
clipping at 1.0 and AdamW per step, so its step does the work ours does.
"""

from __future__ import annotations

import os
import traceback

import torch

from bench import train_throughput as tt


def hf_model(mcfg, seed: int, device: torch.device, **hf_overrides) -> torch.nn.Module:
    """The Hugging Face model of `mcfg` (Qwen2ForCausalLM / Qwen2MoeForCausalLM): fp32 weights drawn
    from `seed` on `device`, SDPA attention, no KV cache; `hf_overrides` set fields of its config."""
    import transformers

    from megatron_qwen2.checkpoint.hf import model_config_to_hf_config

    hf = dict(model_config_to_hf_config(mcfg, dtype="float32"), **hf_overrides)
    config = transformers.AutoConfig.for_model(hf.pop("model_type"), **hf)
    config.use_cache = False
    torch.manual_seed(seed)
    with device:
        return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)


class HFStep:
    """Qwen2ForCausalLM / Qwen2MoeForCausalLM as the Trainer runs it with bf16=True: fp32 weights,
    bf16 autocast, SDPA attention, fused AdamW on the fp32 weights, max_grad_norm 1.0."""

    def __init__(self, mcfg, args, device: torch.device):
        import transformers

        # our step adds the load-balancing loss; so does HF's with router logits on
        self.model = hf_model(mcfg, args.seed, device, **({"output_router_logits": True} if mcfg.is_moe else {}))
        self.model.train()
        self.version = transformers.__version__
        decay = [p for p in self.model.parameters() if p.ndim >= 2]
        no_decay = [p for p in self.model.parameters() if p.ndim < 2]
        fused = device.type == "cuda"
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                                            {"params": no_decay, "weight_decay": 0.0}],
                                           lr=3e-4, betas=(0.9, 0.95), eps=1e-8, fused=fused)
        self.fused = fused
        self.args, self.device = args, device
        self.batches = tt.random_batches(mcfg.vocab_size, args.gbs, args.seq, device, args.seed)

    def __call__(self) -> float:
        args = self.args
        micro = next(self.batches)[:, :args.seq].split(args.mbs)  # HF shifts the labels itself
        total = torch.zeros((), device=self.device)
        for ids in micro:
            with torch.autocast(self.device.type, dtype=torch.bfloat16):
                loss = self.model(input_ids=ids, labels=ids).loss / len(micro)
            loss.backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total.item()

    def info(self) -> dict:
        return {"transformers": self.version, "attn_implementation": "sdpa", "adamw_fused": self.fused,
                "precision": "fp32 weights, bf16 autocast"}


def mcore_importable() -> bool:
    try:
        import megatron.core  # noqa: F401
    except Exception:  # noqa: BLE001 - absent or broken: the baseline is reported as not importable
        return False
    return True


class MCoreStep:
    """Megatron-Core GPTModel in the Qwen2 shape (local layer spec: no Transformer Engine on the image),
    bf16 parameters with an fp32 main-grad buffer (its DistributedDataParallel), Megatron's mixed
    precision optimizer (fp32 masters, AdamW) with clipping at 1.0."""

    def __init__(self, mcfg, args, device: torch.device):
        import torch.distributed as dist
        import torch.nn.functional as F
        from megatron.core import parallel_state
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
        from megatron.core.models.gpt.gpt_model import GPTModel
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
        from megatron.core.transformer.transformer_config import TransformerConfig

        if device.type != "cuda":
            raise RuntimeError("the Megatron-Core baseline runs on CUDA only")
        if mcfg.is_moe:
            raise RuntimeError("the Megatron-Core baseline covers the dense models")
        if not dist.is_initialized():
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", "29533")
            dist.init_process_group("nccl", rank=0, world_size=1)
        if not parallel_state.model_parallel_is_initialized():
            parallel_state.initialize_model_parallel(1, 1, create_gloo_process_groups=False)
        model_parallel_cuda_manual_seed(args.seed)
        tc = TransformerConfig(
            num_layers=mcfg.num_layers, hidden_size=mcfg.hidden_size, num_attention_heads=mcfg.num_attention_heads,
            num_query_groups=mcfg.num_kv_heads, kv_channels=mcfg.kv_channels, ffn_hidden_size=mcfg.ffn_hidden_size,
            normalization="RMSNorm", layernorm_epsilon=mcfg.rms_norm_eps, gated_linear_unit=True,
            activation_func=F.silu, add_bias_linear=False, add_qkv_bias=mcfg.qkv_bias, hidden_dropout=0.0,
            attention_dropout=0.0, bf16=True, params_dtype=torch.bfloat16, init_method_std=mcfg.init_std,
            bias_activation_fusion=False, masked_softmax_fusion=False, bias_dropout_fusion=False,
            apply_rope_fusion=False, persist_layer_norm=False, gradient_accumulation_fusion=False,
            recompute_granularity="full" if args.recompute == "full" else None,
            recompute_method="uniform" if args.recompute == "full" else None,
            recompute_num_layers=1 if args.recompute == "full" else None)
        spec = get_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=False)
        with device:
            model = GPTModel(config=tc, transformer_layer_spec=spec, vocab_size=mcfg.vocab_size,
                             max_sequence_length=args.seq, pre_process=True, post_process=True,
                             share_embeddings_and_output_weights=mcfg.tie_word_embeddings,
                             position_embedding_type="rope", rotary_base=int(mcfg.rope_theta))
        model.cuda()
        ddp_cfg = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                                use_distributed_optimizer=False)
        self.model = DistributedDataParallel(config=tc, ddp_config=ddp_cfg, module=model)
        opt_cfg = OptimizerConfig(optimizer="adam", lr=3e-4, weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95,
                                  adam_eps=1e-8, clip_grad=1.0, bf16=True, params_dtype=torch.bfloat16,
                                  use_distributed_optimizer=False)
        self.optimizer = get_megatron_optimizer(opt_cfg, [self.model], use_gloo_process_groups=False)
        self.args, self.device = args, device
        self.batches = tt.random_batches(mcfg.vocab_size, args.gbs, args.seq, device, args.seed)
        pos = torch.arange(args.seq, device=device).expand(args.mbs, args.seq)
        self.position_ids = pos

    def __call__(self) -> float:
        args = self.args
        micro = next(self.batches).split(args.mbs)
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        total = torch.zeros((), device=self.device)
        for rows in micro:
            ids, labels = rows[:, :-1], rows[:, 1:]
            token_loss = self.model(ids, self.position_ids, None, labels=labels)  # [b, s] fp32
            loss = token_loss.float().mean() / len(micro)
            loss.backward()
            total += loss.detach()
        self.model.finish_grad_sync()
        self.optimizer.step()
        return total.item()

    def info(self) -> dict:
        import megatron.core

        return {"megatron_core": getattr(megatron.core, "__version__", "unknown"),
                "layer_spec": "local (no Transformer Engine)"}


def run_baseline(name: str, cls, mcfg, args, device, flops_per_token: float, ceiling) -> dict:
    """Measure one baseline; a failure (not installed, out of memory ...) becomes an error row."""
    if cls is MCoreStep and not mcore_importable():
        print("megatron-core: not importable", flush=True)
        return {"system": name, "error": "not importable"}
    tt.reset_memory(device)
    step = None
    try:
        step = cls(mcfg, args, device)
        timed = tt.time_steps(step, device, args.warmup, args.steps)
        row = tt.score(name, timed["step_times_s"], timed["losses"], args.gbs * args.seq, flops_per_token,
                       ceiling, device)
        row.update(step.info())
    except Exception as e:  # noqa: BLE001 - reported in the table and the JSON, the run goes on
        traceback.print_exc()
        row = {"system": name, "error": f"{type(e).__name__}: {str(e)[:500]}", **tt.memory(device)}
    del step
    tt.reset_memory(device)
    return row
