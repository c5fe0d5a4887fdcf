"""The Llama block: pre-norm RMSNorm, RoPE attention with grouped-query heads, a SwiGLU MLP.

``GPT`` (gpt/model.py) builds these blocks for ``GPTConfig(arch="llama")``; this file holds what
differs from GPT-2, with the same module names (``ln_1``, ``attn.c_attn``, ``attn.c_proj``, ``ln_2``,
``mlp.c_fc``, ``mlp.c_proj``) so that everything walking the model (FSDP's per-block sharding, the
optimizer's decay groups, checkpoints) treats both architectures alike. Every op goes through
``gpt_kernels.registry.ops``: ``rmsnorm``, ``rope``, ``swiglu``, ``attention``, ``decode_attention``.

* The projections are fused: ``c_attn`` writes [q | k | v] (Hq + 2·Hkv heads), ``c_fc`` writes
  [gate | up]; loading Hugging Face weights concatenates their rows in that order.
* Grouped-query attention: k and v keep their ``n_kv_head`` heads; the attention and decode ops
  (Triton kernels and PyTorch references alike) read each shared K/V head in place, never repeated.
* Hugging Face's ``LlamaForCausalLM`` weights load through :func:`load_hf_llama`
  (``GPT.from_pretrained`` picks it for a Llama-layout folder).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from gpt.config import GPTConfig
from gpt_kernels.registry import ops


class RMSNorm(nn.Module):
    """``forward(x, residual)`` returns ``(rmsnorm(x + residual), x + residual)``, as the LayerNorm does."""

    def __init__(self, ndim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.eps = eps

    def forward(self, x, residual=None):
        return ops.rmsnorm(x, self.weight, self.eps, residual=residual)


class LlamaAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.kv_heads, config.head_dim
        kv_width = self.n_kv_head * self.head_dim
        self.c_attn = nn.Linear(config.n_embd, config.n_embd + 2 * kv_width, bias=config.bias)  # [q | k | v]
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.residual_projection = True
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, rope, kv_cache=None, layer=0):
        B, T, C = x.shape
        kv_width = self.n_kv_head * self.head_dim
        q, k, v = self.c_attn(x).split([C, kv_width, kv_width], dim=2)
        q = q.view(B, T, self.n_head, self.head_dim)
        k = k.view(B, T, self.n_kv_head, self.head_dim)
        cos, sin, positions = rope
        q, k = ops.rope(q, k, cos, sin, positions)
        # (B, T, H, D) -> (B, H, T, D) views: the attention kernels read them through their strides.
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if kv_cache is None:
            y = ops.attention(q, k, v, causal=True)
        elif kv_cache.prefilling:
            kv_cache.write(layer, k, v)
            y = ops.attention(q, k, v, causal=True)
        else:  # one new token per row, already rotated to its own position
            keys, values = kv_cache.write(layer, k, v)
            y = ops.decode_attention(q, keys, values, kv_cache.step_lengths)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class SwiGLUMLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 2 * config.mlp_width, bias=config.bias)  # [gate | up]
        self.c_proj = nn.Linear(config.mlp_width, config.n_embd, bias=config.bias)
        self.c_proj.residual_projection = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(ops.swiglu(self.c_fc(x))))


class LlamaBlock(nn.Module):
    """``x = x + attn(rmsnorm_1(x)); x = x + mlp(rmsnorm_2(x))``, each residual add done by the
    norm that follows it, as in GPT-2's :class:`~gpt.model.Block` (same ``forward`` contract;
    ``rope`` is ``(cos, sin, positions)``)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = RMSNorm(config.n_embd, config.norm_eps)
        self.attn = LlamaAttention(config)
        self.ln_2 = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = SwiGLUMLP(config)

    def forward(self, x, branch, kv_cache=None, layer=0, rope=None):
        if branch is None:
            h = self.ln_1(x)
        else:
            h, x = self.ln_1(branch, residual=x)
        h, x = self.ln_2(self.attn(h, rope, kv_cache, layer), residual=x)
        return x, self.mlp(h)


# ----------------------------------------------------------------------------- Hugging Face weights


def is_hf_llama(raw: dict[str, torch.Tensor], hf_config: dict) -> bool:
    return hf_config.get("model_type") == "llama" or "model.embed_tokens.weight" in raw


def _hf_rope_theta(hf_config: dict, path: Path) -> float:
    """``rope_theta`` from a transformers 5 (``rope_parameters``) or 4 (``rope_theta``, ``rope_scaling``) config."""
    parameters = hf_config.get("rope_parameters") or {}
    scaling = hf_config.get("rope_scaling") or {}
    rope_type = parameters.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        raise ValueError(f"{path}: RoPE type {rope_type!r} is not supported; only the default rotary embedding is")
    return float(parameters.get("rope_theta", hf_config.get("rope_theta", 10000.0)))


def hf_llama_config(hf_config: dict, path: Path, **overrides) -> GPTConfig:
    """Our config for a Hugging Face ``LlamaConfig`` (its ``config.json`` as a dict)."""
    if not hf_config:
        raise ValueError(f"{path}: a Llama checkpoint needs its config.json (heads, KV heads, RoPE theta, eps)")
    required = ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size", "vocab_size")
    missing = [key for key in required if key not in hf_config]
    if missing:
        raise ValueError(f"{path}: config.json lacks {', '.join(missing)}, which a Llama config must hold")
    n_embd, n_head = hf_config["hidden_size"], hf_config["num_attention_heads"]
    if hf_config.get("head_dim") not in (None, n_embd // n_head):
        raise ValueError(f"{path}: head_dim {hf_config['head_dim']} != hidden_size / num_attention_heads "
                         "is not supported")
    if hf_config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{path}: hidden_act {hf_config['hidden_act']!r} is not supported; only silu (SwiGLU) is")
    if hf_config.get("attention_bias", False) != hf_config.get("mlp_bias", False):
        raise ValueError(f"{path}: attention_bias and mlp_bias must agree (one bias switch here)")
    values = dict(
        arch="llama",
        block_size=hf_config.get("max_position_embeddings", 2048),
        vocab_size=hf_config["vocab_size"],
        n_layer=hf_config["num_hidden_layers"],
        n_head=n_head,
        n_kv_head=hf_config.get("num_key_value_heads") or n_head,
        n_embd=n_embd,
        mlp_hidden=hf_config["intermediate_size"],
        rope_theta=_hf_rope_theta(hf_config, path),
        norm_eps=hf_config.get("rms_norm_eps", 1e-6),
        tie_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
        bias=bool(hf_config.get("attention_bias", False)),
        dropout=0.0,
    )
    values.update(overrides)
    return GPTConfig(**values)


def hf_llama_state(raw: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    """Hugging Face's tensor names -> ours: q/k/v and gate/up rows concatenated, the vocabulary padded."""
    def padded(table):
        out = table.new_zeros((config.padded_vocab_size, table.shape[1]))
        out[: table.shape[0]] = table
        return out

    raw = dict(raw)
    state = {"transformer.wte.weight": padded(raw.pop("model.embed_tokens.weight")),
             "transformer.ln_f.weight": raw.pop("model.norm.weight")}
    lm_head = raw.pop("lm_head.weight", None)
    if config.tie_embeddings:
        state["lm_head.weight"] = state["transformer.wte.weight"]
    elif lm_head is None:
        raise ValueError("missing tensor 'lm_head.weight' (the config says the embeddings are untied)")
    else:
        state["lm_head.weight"] = padded(lm_head)
    suffixes = ["weight", "bias"] if config.bias else ["weight"]
    for i in range(config.n_layer):
        hf, ours = f"model.layers.{i}.", f"transformer.h.{i}."
        state[ours + "ln_1.weight"] = raw.pop(hf + "input_layernorm.weight")
        state[ours + "ln_2.weight"] = raw.pop(hf + "post_attention_layernorm.weight")
        for s in suffixes:
            state[ours + f"attn.c_attn.{s}"] = torch.cat([raw.pop(hf + f"self_attn.{p}_proj.{s}") for p in "qkv"])
            state[ours + f"attn.c_proj.{s}"] = raw.pop(hf + f"self_attn.o_proj.{s}")
            state[ours + f"mlp.c_fc.{s}"] = torch.cat([raw.pop(hf + f"mlp.{p}_proj.{s}") for p in ("gate", "up")])
            state[ours + f"mlp.c_proj.{s}"] = raw.pop(hf + f"mlp.down_proj.{s}")
    leftover = [k for k in raw if not k.endswith("rotary_emb.inv_freq")]
    if leftover:
        raise ValueError(f"unexpected tensors {sorted(leftover)[:5]}{' ...' if len(leftover) > 5 else ''}")
    return state


def load_hf_llama(model_class, raw: dict[str, torch.Tensor], hf_config: dict, path: Path, **overrides):
    """A ``model_class`` (``GPT``) holding a Hugging Face ``LlamaForCausalLM``'s weights."""
    config = hf_llama_config(hf_config, path, **overrides)
    try:
        state = hf_llama_state(raw, config)
    except KeyError as e:
        raise ValueError(f"{path}: missing tensor {e.args[0]!r} for a Llama checkpoint") from None
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    model = model_class(config)
    ours = model.state_dict()
    for key, value in state.items():
        if ours[key].shape != value.shape:
            raise ValueError(f"{path}: {key} has shape {tuple(value.shape)}, expected {tuple(ours[key].shape)}")
    model.load_state_dict(state)
    return model
