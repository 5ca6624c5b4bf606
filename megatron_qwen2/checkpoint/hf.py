"""Hugging Face <-> native mapping of configs and tensors (pure rearrangement, bit-exact).

Native tensors use global (unsharded) names and shapes. Where native fuses what HF keeps
apart, the fused layout is:
- attention.qkv.weight [(nq + 2 nkv) * d, h], rows grouped by kv head j: q heads of group j, k_j, v_j
- mlp.gate_up.weight [2, ffn, h] (gate, up)
- mlp.experts.gate_up_weight [E, 2 ffn_e, h] (per expert [gate | up] rows), down_weight [E, h, ffn_e]
HF's on-disk MoE form names experts one by one (`mlp.experts.N.gate_proj.weight`); recent
`transformers` also accepts/produces fused in-memory tensors, which import accepts too.
"""

from __future__ import annotations

import torch

from megatron_qwen2.config import ModelConfig

_HF_ARCH = {False: ("Qwen2ForCausalLM", "qwen2"), True: ("Qwen2MoeForCausalLM", "qwen2_moe")}


def hf_config_to_model_config(hf: dict, name: str = "hf") -> ModelConfig:
    """Read an HF config.json dict (qwen2 or qwen2_moe) into a validated ModelConfig."""
    model_type = hf.get("model_type")
    if model_type not in ("qwen2", "qwen2_moe"):
        raise ValueError(f"config.json model_type must be 'qwen2' or 'qwen2_moe', got {model_type!r}")
    if hf.get("use_sliding_window"):
        raise ValueError("config.json use_sliding_window=true is not supported (Qwen2 trains with full attention)")
    rope = dict(hf.get("rope_parameters") or {})
    scaling = hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    if rope_type not in ("default", "yarn", "linear"):
        raise ValueError(f"config.json rope type {rope_type!r} is not supported (default, linear, yarn)")
    params = {**scaling, **rope}
    heads = hf["num_attention_heads"]
    cfg = ModelConfig(
        name=name,
        hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_attention_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads", heads),
        head_dim=hf.get("head_dim") if hf.get("head_dim") not in (None, hf["hidden_size"] // heads) else None,
        ffn_hidden_size=hf["intermediate_size"],
        vocab_size=hf["vocab_size"],
        max_position_embeddings=hf.get("max_position_embeddings", 32768),
        rope_theta=float(theta),
        rope_scaling_type=None if rope_type == "default" else rope_type,
        rope_scaling_factor=float(params.get("factor", 1.0)),
        rope_original_max_position_embeddings=params.get("original_max_position_embeddings"),
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=bool(hf.get("qkv_bias", True)),
        init_std=hf.get("initializer_range", 0.02),
    )
    if model_type == "qwen2_moe":
        cfg.num_experts = hf["num_experts"]
        cfg.moe_top_k = hf["num_experts_per_tok"]
        cfg.moe_ffn_hidden_size = hf["moe_intermediate_size"]
        cfg.shared_expert_ffn_hidden_size = hf.get("shared_expert_intermediate_size", 0)
        cfg.norm_topk_prob = bool(hf.get("norm_topk_prob", False))
        cfg.decoder_sparse_step = hf.get("decoder_sparse_step", 1)
        cfg.mlp_only_layers = list(hf.get("mlp_only_layers") or [])
        cfg.aux_loss_coef = hf.get("router_aux_loss_coef", 0.001)
    return cfg.validate()


def model_config_to_hf_config(cfg: ModelConfig, dtype: str = "bfloat16") -> dict:
    """The config.json an HF `transformers` Qwen2 / Qwen2-MoE model loads."""
    arch, model_type = _HF_ARCH[cfg.is_moe]
    rope: dict = {"rope_theta": cfg.rope_theta, "rope_type": cfg.rope_scaling_type or "default"}
    if cfg.rope_scaling_type is not None:
        rope["factor"] = cfg.rope_scaling_factor
        if cfg.rope_original_max_position_embeddings is not None:
            rope["original_max_position_embeddings"] = cfg.rope_original_max_position_embeddings
    hf = {
        "architectures": [arch],
        "model_type": model_type,
        "hidden_act": "silu",
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "intermediate_size": cfg.ffn_hidden_size,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": rope,
        "rms_norm_eps": cfg.rms_norm_eps,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "initializer_range": cfg.init_std,
        "attention_dropout": 0.0,
        "use_sliding_window": False,
        "torch_dtype": dtype,
    }
    if cfg.head_dim is not None:
        hf["head_dim"] = cfg.head_dim
    if not cfg.qkv_bias:
        hf["qkv_bias"] = False
    if cfg.is_moe:
        hf.update(
            num_experts=cfg.num_experts,
            num_experts_per_tok=cfg.moe_top_k,
            moe_intermediate_size=cfg.moe_ffn_hidden_size,
            shared_expert_intermediate_size=cfg.shared_expert_ffn_hidden_size,
            norm_topk_prob=cfg.norm_topk_prob,
            decoder_sparse_step=cfg.decoder_sparse_step,
            mlp_only_layers=list(cfg.mlp_only_layers),
            router_aux_loss_coef=cfg.aux_loss_coef,
        )
    return hf


def expected_native_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every native parameter name with its global shape."""
    h, d, f = cfg.hidden_size, cfg.kv_channels, cfg.ffn_hidden_size
    nq, nkv = cfg.num_attention_heads, cfg.num_kv_heads
    shapes: dict[str, tuple[int, ...]] = {"embedding.weight": (cfg.vocab_size, h)}
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        shapes[p + "input_norm.weight"] = (h,)
        shapes[p + "attention.qkv.weight"] = ((nq + 2 * nkv) * d, h)
        if cfg.qkv_bias:
            shapes[p + "attention.qkv.bias"] = ((nq + 2 * nkv) * d,)
        shapes[p + "attention.out.weight"] = (h, nq * d)
        shapes[p + "post_attention_norm.weight"] = (h,)
        if cfg.is_moe_layer(i):
            e, fe, fs = cfg.num_experts, cfg.moe_ffn_hidden_size, cfg.shared_expert_ffn_hidden_size
            shapes[p + "mlp.router.weight"] = (e, h)
            shapes[p + "mlp.experts.gate_up_weight"] = (e, 2 * fe, h)
            shapes[p + "mlp.experts.down_weight"] = (e, h, fe)
            if fs > 0:
                shapes[p + "mlp.shared_expert.gate_up.weight"] = (2, fs, h)
                shapes[p + "mlp.shared_expert.down.weight"] = (h, fs)
                shapes[p + "mlp.shared_expert_gate.weight"] = (1, h)
        else:
            shapes[p + "mlp.gate_up.weight"] = (2, f, h)
            shapes[p + "mlp.down.weight"] = (h, f)
    shapes["final_norm.weight"] = (h,)
    if not cfg.tie_word_embeddings:
        shapes["output.weight"] = (cfg.vocab_size, h)
    return shapes


def _check_shapes(tensors: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], what: str) -> None:
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise ValueError(f"{what}: missing tensor(s) {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != tuple(shape):
            raise ValueError(f"{what}: tensor {name} has shape {tuple(tensors[name].shape)}, expected {tuple(shape)}")


class _Consumer:
    """Hands out HF tensors by name and remembers which were used, to report extras."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors, self.used = tensors, set()

    def take(self, name: str) -> torch.Tensor:
        if name not in self.tensors:
            raise ValueError(f"HF checkpoint: missing tensor {name}")
        self.used.add(name)
        return self.tensors[name]

    def has(self, name: str) -> bool:
        return name in self.tensors

    def extras(self) -> list[str]:
        return sorted(set(self.tensors) - self.used)


def expected_hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every HF on-disk tensor name with its shape (per-expert MoE names)."""
    meta = {k: torch.empty(v, device="meta") for k, v in expected_native_shapes(cfg).items()}
    return {k: tuple(v.shape) for k, v in native_to_hf(meta, cfg).items()}


def hf_to_native(tensors: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """HF state (on-disk names) -> native global state. Missing, extra or mis-shaped: ValueError."""
    for name, shape in expected_hf_shapes(cfg).items():
        if name in tensors and tuple(tensors[name].shape) != shape:
            raise ValueError(f"HF checkpoint: tensor {name} has shape {tuple(tensors[name].shape)}, expected {shape}")
    src = _Consumer(tensors)
    nq, nkv, d = cfg.num_attention_heads, cfg.num_kv_heads, cfg.kv_channels
    g = nq // nkv
    out: dict[str, torch.Tensor] = {"embedding.weight": src.take("model.embed_tokens.weight")}
    for i in range(cfg.num_layers):
        hp, p = f"model.layers.{i}.", f"layers.{i}."
        out[p + "input_norm.weight"] = src.take(hp + "input_layernorm.weight")
        out[p + "post_attention_norm.weight"] = src.take(hp + "post_attention_layernorm.weight")
        attn = hp + "self_attn."
        for kind in ("weight", "bias") if cfg.qkv_bias else ("weight",):
            q, k, v = (src.take(f"{attn}{x}_proj.{kind}") for x in "qkv")
            _check_shapes({"q": q, "k": k, "v": v},
                          {"q": (nq * d, *q.shape[1:]), "k": (nkv * d, *q.shape[1:]), "v": (nkv * d, *q.shape[1:])},
                          f"HF checkpoint layer {i} {kind}")
            out[p + f"attention.qkv.{kind}"] = fuse_qkv(q, k, v, nkv, g, d)
        out[p + "attention.out.weight"] = src.take(attn + "o_proj.weight")
        mlp = hp + "mlp."
        if cfg.is_moe_layer(i):
            out[p + "mlp.router.weight"] = src.take(mlp + "gate.weight")
            if src.has(mlp + "experts.gate_up_proj"):  # fused in-memory form of recent transformers
                out[p + "mlp.experts.gate_up_weight"] = src.take(mlp + "experts.gate_up_proj")
                out[p + "mlp.experts.down_weight"] = src.take(mlp + "experts.down_proj")
            else:
                ex = [f"{mlp}experts.{e}." for e in range(cfg.num_experts)]
                out[p + "mlp.experts.gate_up_weight"] = torch.stack(
                    [torch.cat([src.take(x + "gate_proj.weight"), src.take(x + "up_proj.weight")]) for x in ex])
                out[p + "mlp.experts.down_weight"] = torch.stack([src.take(x + "down_proj.weight") for x in ex])
            if cfg.shared_expert_ffn_hidden_size > 0:
                se = mlp + "shared_expert."
                out[p + "mlp.shared_expert.gate_up.weight"] = torch.stack(
                    [src.take(se + "gate_proj.weight"), src.take(se + "up_proj.weight")])
                out[p + "mlp.shared_expert.down.weight"] = src.take(se + "down_proj.weight")
                out[p + "mlp.shared_expert_gate.weight"] = src.take(mlp + "shared_expert_gate.weight")
        else:
            out[p + "mlp.gate_up.weight"] = torch.stack(
                [src.take(mlp + "gate_proj.weight"), src.take(mlp + "up_proj.weight")])
            out[p + "mlp.down.weight"] = src.take(mlp + "down_proj.weight")
    out["final_norm.weight"] = src.take("model.norm.weight")
    if cfg.tie_word_embeddings:
        if src.has("lm_head.weight"):  # some tied checkpoints store the head anyway: it must be the table
            head = src.take("lm_head.weight")
            if not torch.equal(head, out["embedding.weight"]):
                raise ValueError("HF checkpoint: tie_word_embeddings=true but lm_head.weight differs "
                                 "from model.embed_tokens.weight")
    else:
        out["output.weight"] = src.take("lm_head.weight")
    extras = src.extras()
    if extras:
        raise ValueError(f"HF checkpoint: unexpected tensor(s) {extras[:8]}{' ...' if len(extras) > 8 else ''}")
    _check_shapes(out, expected_native_shapes(cfg), "HF checkpoint")
    return out


def native_to_hf(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Native global state -> HF state with on-disk names (per-expert MoE tensors)."""
    expected = expected_native_shapes(cfg)
    _check_shapes(state, expected, "native checkpoint")
    extras = sorted(set(state) - set(expected))
    if extras:
        raise ValueError(f"native checkpoint: unexpected tensor(s) {extras[:8]}")
    nq, nkv, d = cfg.num_attention_heads, cfg.num_kv_heads, cfg.kv_channels
    g = nq // nkv
    out: dict[str, torch.Tensor] = {"model.embed_tokens.weight": state["embedding.weight"]}
    for i in range(cfg.num_layers):
        hp, p = f"model.layers.{i}.", f"layers.{i}."
        out[hp + "input_layernorm.weight"] = state[p + "input_norm.weight"]
        out[hp + "post_attention_layernorm.weight"] = state[p + "post_attention_norm.weight"]
        for kind in ("weight", "bias") if cfg.qkv_bias else ("weight",):
            q, k, v = split_qkv(state[p + f"attention.qkv.{kind}"], nkv, g, d)
            for x, t in zip("qkv", (q, k, v)):
                out[f"{hp}self_attn.{x}_proj.{kind}"] = t
        out[hp + "self_attn.o_proj.weight"] = state[p + "attention.out.weight"]
        mlp = hp + "mlp."
        if cfg.is_moe_layer(i):
            out[mlp + "gate.weight"] = state[p + "mlp.router.weight"]
            gate_up, down = state[p + "mlp.experts.gate_up_weight"], state[p + "mlp.experts.down_weight"]
            for e in range(cfg.num_experts):
                gate, up = gate_up[e].chunk(2)
                out[f"{mlp}experts.{e}.gate_proj.weight"] = gate.contiguous()
                out[f"{mlp}experts.{e}.up_proj.weight"] = up.contiguous()
                out[f"{mlp}experts.{e}.down_proj.weight"] = down[e].contiguous()
            if cfg.shared_expert_ffn_hidden_size > 0:
                gu = state[p + "mlp.shared_expert.gate_up.weight"]
                out[mlp + "shared_expert.gate_proj.weight"] = gu[0].contiguous()
                out[mlp + "shared_expert.up_proj.weight"] = gu[1].contiguous()
                out[mlp + "shared_expert.down_proj.weight"] = state[p + "mlp.shared_expert.down.weight"]
                out[mlp + "shared_expert_gate.weight"] = state[p + "mlp.shared_expert_gate.weight"]
        else:
            gu = state[p + "mlp.gate_up.weight"]
            out[mlp + "gate_proj.weight"] = gu[0].contiguous()
            out[mlp + "up_proj.weight"] = gu[1].contiguous()
            out[mlp + "down_proj.weight"] = state[p + "mlp.down.weight"]
    out["model.norm.weight"] = state["final_norm.weight"]
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = state["output.weight"]
    return out


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, nkv: int, g: int, d: int) -> torch.Tensor:
    """[nq*d, ...], [nkv*d, ...] x2 -> [(nq + 2 nkv) * d, ...] grouped by kv head."""
    rest = q.shape[1:]
    grouped = torch.cat([q.reshape(nkv, g * d, *rest), k.reshape(nkv, d, *rest), v.reshape(nkv, d, *rest)], dim=1)
    return grouped.reshape(-1, *rest)


def split_qkv(qkv: torch.Tensor, nkv: int, g: int, d: int) -> tuple[torch.Tensor, ...]:
    """Inverse of fuse_qkv."""
    rest = qkv.shape[1:]
    grouped = qkv.reshape(nkv, (g + 2) * d, *rest)
    q, k, v = grouped.split([g * d, d, d], dim=1)
    return tuple(t.reshape(-1, *rest).contiguous() for t in (q, k, v))

