"""GPT-2, written to be read top to bottom (after nanoGPT's model.py), and the Llama variant.

Every op that has a Triton kernel (LayerNorm, attention, GELU, the loss) is called through
``gpt_kernels.registry.ops``, so switching a kernel on or off never touches this file.

Two things differ from a textbook GPT-2, both for speed and neither for the math:
* the embedding (tied to lm_head) has 50304 rows, a multiple of 64, while the loss and the
  returned logits cover only the 50257 real tokens;
* each LayerNorm also adds the residual branch that precedes it (``ln(x + branch)`` and the new
  stream in one op), so a block passes its last branch on instead of adding it itself.

``GPTConfig(arch="llama")`` swaps in the blocks of gpt/llama.py (RMSNorm, RoPE, SwiGLU, grouped-query
attention) and drops the learned position embedding; everything else here serves both.

For generation (gpt/generate.py) ``forward`` also takes a :class:`KVCache`: the prompt is run once
(prefill, through the causal ``ops.attention``) and each later token is one row of queries against
the cached keys and values (``ops.decode_attention``). Training never passes a cache.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt.config import GPTConfig
from gpt.llama import LlamaBlock, RMSNorm, is_hf_llama, load_hf_llama
from gpt_kernels.registry import ops
from gpt_kernels.rope import compute_rope_table

__all__ = ["GPT", "GPTConfig", "KVCache", "ops_called"]

LAYER_NORM_EPS = 1e-5


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias; ``forward(x, residual)`` returns ``(ln(x + residual), x + residual)``."""

    def __init__(self, ndim: int, bias: bool, eps: float = LAYER_NORM_EPS):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None
        self.eps = eps

    def forward(self, x, residual=None):
        return ops.layernorm(x, self.weight, self.bias, self.eps, residual=residual)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.residual_projection = True
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, kv_cache=None, layer=0):
        B, T, C = x.shape
        qkv = self.c_attn(x)
        if kv_cache is None:
            # q, k, v packed as c_attn wrote them: the kernel reads the heads in place and writes their
            # gradient as one (B, T, 3C) tensor, with no concatenation in the backward.
            y = ops.attention_qkv(qkv, self.n_head, causal=True)
            return self.resid_dropout(self.c_proj(y))
        # (B, T, C) -> (B, H, T, D) views: the attention kernel reads them through their strides.
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in qkv.split(C, dim=2))
        if kv_cache.prefilling:
            kv_cache.write(layer, k, v)
            y = ops.attention(q, k, v, causal=True)
        else:  # one new token per row: its query against every cached key of its row
            keys, values = kv_cache.write(layer, k, v)
            y = ops.decode_attention(q, keys, values, kv_cache.step_lengths)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.mlp_width, bias=config.bias)
        self.c_proj = nn.Linear(config.mlp_width, config.n_embd, bias=config.bias)
        self.c_proj.residual_projection = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        # c_fc's bias is added inside the GELU op, which reads the pre-activation once.
        h = ops.gelu(F.linear(x, self.c_fc.weight), self.c_fc.bias)
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    """A pre-norm block: ``x = x + attn(ln_1(x)); x = x + mlp(ln_2(x))``.

    Each residual add is done by the LayerNorm that follows it, so the block takes the stream
    ``x`` with the previous block's last branch still to be added, and returns the same pair.
    ``rope`` is the Llama block's; GPT-2 adds its positions below the first block instead.
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias, eps=config.norm_eps)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias, eps=config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, branch, kv_cache=None, layer=0, rope=None):
        if branch is None:
            h = self.ln_1(x)
        else:
            h, x = self.ln_1(branch, residual=x)
        h, x = self.ln_2(self.attn(h, kv_cache, layer), residual=x)
        return x, self.mlp(h)


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        llama = config.arch == "llama"
        block = LlamaBlock if llama else Block
        self.transformer = nn.ModuleDict(dict(wte=nn.Embedding(config.padded_vocab_size, config.n_embd)))
        if llama:  # RoPE's cos/sin tables, (block_size, head_dim/2) fp32, computed once (not saved)
            cos, sin = compute_rope_table(config.block_size, config.head_dim, config.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        else:
            self.transformer.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.transformer.drop = nn.Dropout(config.dropout)
        self.transformer.h = nn.ModuleList([block(config) for _ in range(config.n_layer)])
        if llama:
            self.transformer.ln_f = RMSNorm(config.n_embd, config.norm_eps)
        else:
            self.transformer.ln_f = LayerNorm(config.n_embd, config.bias, config.norm_eps)
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight  # tied, as in GPT-2
        self.apply(self._init_weights)

    def _init_weights(self, module):
        # GPT-2: N(0, 0.02) everywhere; projections into the residual stream scaled by 1/sqrt(2·n_layer),
        # since 2·n_layer of them add up in the stream.
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "residual_projection", False):
                std /= math.sqrt(2 * self.config.n_layer)
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_parameters(self) -> int:
        """All parameters, a tied embedding counted once."""
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token: 6·N + 6·L·T·C.

        N counts the parameters that take part in a matmul (all but the position embedding, which
        is only added, and an untied token embedding, which is only looked up): each costs 2 FLOPs
        forward and 4 backward. Causal attention adds
        QKᵀ and AV, 2·2·T·C FLOPs per token per layer forward, halved by the causal mask, times 3
        for forward + backward: 6·L·T·C.
        """
        n = self.num_parameters()
        if "wpe" in self.transformer:
            n -= self.transformer.wpe.weight.numel()
        if not self.config.tie_embeddings:
            n -= self.transformer.wte.weight.numel()
        return 6 * n + 6 * self.config.n_layer * seq_len * self.config.n_embd

    def forward(self, idx, targets=None, ignore_index=-100, kv_cache=None, prompt_lengths=None, check_inputs=True,
                loss_scale=1.0, fused_loss=False):
        """Returns ``(logits, loss)``: logits (B, T, vocab_size) and the mean loss over non-ignored targets.

        ``fused_loss=True`` (with ``targets``) computes the loss straight from the hidden states with
        ``ops.linear_cross_entropy`` (lm_head + loss in fused GEMMs: the logits exist only as the op's
        own compute-dtype buffer) and ``logits`` is None. The caller decides, never a kernel switch: the training step asks for it
        where the fused kernel runs on Triton (``gpt.training.fused_loss_on``).

        Generation passes a ``kv_cache`` and gets ``(logits, None)`` with logits (B, vocab_size) of
        each row's last token only. An empty cache is filled from the prompts (prefill): row ``b``'s
        prompt is ``idx[b, :prompt_lengths[b]]`` (all T tokens when None), right-padded with any
        token, which causal attention keeps out of every prompt position. Once the cache holds
        tokens, ``idx`` is (B, 1): one new token per row, at position ``kv_cache.lengths[b]``.

        ``check_inputs=False`` skips the range checks of token ids and targets, which cost a host
        sync each per call on a GPU; the training loop passes it because its loader has checked
        every shard's ids once. Shapes and dtypes are always checked (on the host, for free).

        ``loss_scale`` multiplies the returned loss: gradient accumulation passes ``1/grad_accum`` and
        calls ``loss.backward()``, so that the fused loss computes its gradients already scaled instead
        of rescaling them in the backward, as ``(loss / grad_accum).backward()`` makes it do.
        """
        if idx.dim() != 2 or idx.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"idx must be a (B, T) tensor of int64/int32 token ids, got {tuple(idx.shape)} {idx.dtype}")
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds the model's block size {self.config.block_size}")
        # Ids in [vocab_size, padded size) would silently read the padding rows. The check costs one
        # host sync per call, so compiled graphs (which cannot sync) and the training loop leave it
        # to the data loader, which checks every shard once.
        check_inputs = check_inputs and not torch.compiler.is_compiling()
        if check_inputs and idx.numel() and (idx.min() < 0 or idx.max() >= self.config.vocab_size):
            raise ValueError(f"token ids must lie in [0, vocab_size={self.config.vocab_size}), "
                             f"got ids from {idx.min().item()} to {idx.max().item()}")
        if targets is not None and targets.shape != idx.shape:
            raise ValueError(f"targets shape {tuple(targets.shape)} must equal idx shape {tuple(idx.shape)}")
        if kv_cache is not None and targets is not None:
            raise ValueError("targets and kv_cache exclude each other: the cache is for generation, not training")

        if kv_cache is None:
            pos = torch.arange(T, device=idx.device)
        else:
            pos = kv_cache.start_step(idx, prompt_lengths)  # (T,) for a prefill, (B, 1) for a decode step
        x = self.transformer.wte(idx)
        rope = None
        if self.config.arch == "llama":
            rope = (self.rope_cos, self.rope_sin, pos)  # each block rotates its q and k at these positions
        else:
            x = x + self.transformer.wpe(pos)
        x = self.transformer.drop(x)
        branch = None
        for layer, block in enumerate(self.transformer.h):
            x, branch = block(x, branch, kv_cache, layer, rope)
        h, _ = self.transformer.ln_f(branch, residual=x)

        V = self.config.vocab_size
        if kv_cache is not None:
            last = kv_cache.finish_step()  # where each row's last token sits in idx
            h = h[torch.arange(B, device=h.device), last]
            return self.lm_head(h)[:, :V], None
        if targets is not None and fused_loss:
            # The whole padded table: aligned matmuls, the padding rows masked out of the loss by the op
            # (a weight[:V] slice would cost its backward, a V x C copy into wte.grad).
            loss = ops.linear_cross_entropy(h.view(B * T, -1), self.lm_head.weight, targets.reshape(-1),
                                            ignore_index=ignore_index, check_targets=check_inputs, n_classes=V,
                                            loss_scale=loss_scale)
            return None, loss
        logits = self.lm_head(h)[..., :V]
        loss = None
        if targets is not None:
            loss = ops.cross_entropy(logits.view(B * T, -1), targets.reshape(-1), ignore_index=ignore_index,
                                     check_targets=check_inputs)
            if loss_scale != 1.0:
                loss = loss * loss_scale
        return logits, loss

    @classmethod
    def from_pretrained(cls, path: str | Path, **overrides) -> "GPT":
        """GPT-2 or Llama weights in the HuggingFace layout (``GPT2LMHeadModel``, ``LlamaForCausalLM``),
        from a local ``.safetensors``/``.bin`` file or a folder holding one and its ``config.json``
        (optional for GPT-2, needed for Llama). Nothing is downloaded."""
        path = Path(path)
        raw, hf_config = _read_hf_files(path)
        if is_hf_llama(raw, hf_config):
            return load_hf_llama(cls, {k: v.float() for k, v in raw.items()}, hf_config, path, **overrides)
        state = _gpt2_tensors(raw, path)
        wte = state["wte.weight"]
        n_layer = 1 + max(int(key.split(".")[1]) for key in state if key.startswith("h."))
        n_embd = wte.shape[1]
        n_head = hf_config.get("n_head") or _GPT2_HEADS_BY_WIDTH.get(n_embd)
        if n_head is None:
            raise ValueError(
                f"{path}: cannot tell n_head for width {n_embd} without a config.json; pass n_head=..."
            )
        values = dict(
            block_size=state["wpe.weight"].shape[0],
            vocab_size=wte.shape[0],
            n_layer=n_layer,
            n_head=n_head,
            n_embd=n_embd,
            bias=True,
            dropout=0.0,
        )
        values.update(overrides)
        model = cls(GPTConfig(**values))

        # HF's GPT-2 uses Conv1D layers, whose weights are stored (in, out): ours are (out, in).
        conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
        ours = model.state_dict()
        with torch.no_grad():
            for key, value in state.items():
                target_key = f"transformer.{key}"
                if target_key not in ours:
                    raise ValueError(f"{path}: unexpected tensor {key!r} for a GPT-2 checkpoint")
                if key.endswith(conv1d):
                    value = value.t()
                target = ours[target_key]
                if key == "wte.weight":
                    target[: value.shape[0]].copy_(value)
                    target[value.shape[0] :].zero_()
                elif target.shape != value.shape:
                    raise ValueError(f"{path}: {key} has shape {tuple(value.shape)}, expected {tuple(target.shape)}")
                else:
                    target.copy_(value)
        missing = {k for k in ours if k.startswith("transformer.")} - {f"transformer.{k}" for k in state}
        if missing:
            raise ValueError(f"{path}: missing tensors {sorted(missing)[:5]}{' ...' if len(missing) > 5 else ''}")
        return model


def ops_called(config: GPTConfig) -> tuple[str, ...]:
    """The registry ops a model of ``config`` calls (training, the optimizer, generation)."""
    block_ops = ("rmsnorm", "rope", "swiglu") if config.arch == "llama" else ("layernorm", "gelu")
    return block_ops + ("attention", "cross_entropy", "linear_cross_entropy", "adamw", "decode_attention")


class KVCache:
    """The keys and values of every layer for a batch of B sequences being generated.

    Row ``b`` holds ``lengths[b]`` positions. Each layer's buffers, (B, H, max_len, D) with H the key/value
    heads (fewer than the query heads under grouped-query attention; keys stored already rotated by RoPE), are allocated
    once, at the prefill, in the dtype of that layer's keys (bf16 under autocast); slots past a row's
    length (the prefill's padding, or zeros) take no part in attention, and are overwritten as the
    row grows. ``longest`` is max(lengths), kept on the host so that no step waits on the device to know
    how much of the cache to read. Positions are absolute (GPT-2's learned position embedding, RoPE's
    table of ``block_size`` rows), so a full cache cannot slide: ``max_len`` is at most the block size.
    """

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int, device: torch.device | str):
        if not 1 <= max_len <= config.block_size:
            raise ValueError(f"KVCache max_len must be in [1, block_size={config.block_size}], got {max_len}")
        if batch_size < 1:
            raise ValueError(f"KVCache batch_size must be >= 1, got {batch_size}")
        self.max_len = max_len
        self.keys: list[torch.Tensor | None] = [None] * config.n_layer
        self.values: list[torch.Tensor | None] = [None] * config.n_layer
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.longest = 0
        self.prefilling = False
        self.step_lengths = self.lengths  # every row's length once the current step's token is in

    def start_step(self, idx: torch.Tensor, prompt_lengths=None) -> torch.Tensor:
        """Check ``idx`` against the cache and return its tokens' positions."""
        B, T = idx.shape
        if B != self.lengths.shape[0]:
            raise ValueError(f"the cache holds {self.lengths.shape[0]} sequences, idx has {B} rows")
        if self.longest == 0:  # a prefill
            if T > self.max_len:
                raise ValueError(f"a prompt of {T} tokens does not fit the cache's {self.max_len} positions")
            if prompt_lengths is None:
                lengths = torch.full_like(self.lengths, T)
            else:
                # A copy: the cache advances its own lengths, never the caller's tensor.
                lengths = torch.as_tensor(prompt_lengths).to(idx.device, torch.long, copy=True)
                if lengths.shape != (B,) or int(lengths.min()) < 1 or int(lengths.max()) > T:
                    raise ValueError(f"prompt_lengths must be {B} lengths in [1, {T}], got {prompt_lengths}")
            self.prefilling, self.step_lengths, self.longest = True, lengths, int(lengths.max())
            return torch.arange(T, device=idx.device)
        if T != 1 or prompt_lengths is not None:
            raise ValueError(f"a cache that holds tokens takes one new token per row: idx must be ({B}, 1) "
                             f"without prompt_lengths, got {tuple(idx.shape)}")
        if self.longest == self.max_len:
            raise ValueError(f"the cache is full ({self.max_len} positions)")
        self.prefilling, self.step_lengths, self.longest = False, self.lengths + 1, self.longest + 1
        return self.lengths[:, None]

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store this step's keys and values (B, H, T, D) of ``layer``; in a decode step, return the
        layer's keys and values up to the longest row, the new token's included."""
        if self.prefilling:
            B, H, T, D = k.shape
            # Zeroed, not empty: the PyTorch reference's matmul multiplies the masked-out slots by
            # 0, and 0 · NaN (uninitialized memory) would be NaN. The Triton kernel never reads them.
            self.keys[layer] = k.new_zeros((B, H, self.max_len, D))
            self.values[layer] = v.new_zeros((B, H, self.max_len, D))
            self.keys[layer][:, :, :T] = k
            self.values[layer][:, :, :T] = v
            return None
        rows = torch.arange(k.shape[0], device=k.device)
        self.keys[layer][rows, :, self.lengths] = k[:, :, 0].to(self.keys[layer].dtype)
        self.values[layer][rows, :, self.lengths] = v[:, :, 0].to(self.values[layer].dtype)
        return self.keys[layer][:, :, : self.longest], self.values[layer][:, :, : self.longest]

    def finish_step(self) -> torch.Tensor:
        """Commit the step's lengths; returns the index in idx of each row's last token."""
        last = self.step_lengths - 1 if self.prefilling else torch.zeros_like(self.lengths)
        self.lengths = self.step_lengths
        self.prefilling = False
        return last


# GPT-2's released sizes, so a weights file without its config.json still loads.
_GPT2_HEADS_BY_WIDTH = {768: 12, 1024: 16, 1280: 20, 1600: 25}


def _read_hf_files(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors of a weights file (or of the one in a folder) and the folder's config.json, if any."""
    hf_config = {}
    if path.is_dir():
        if (path / "config.json").is_file():
            hf_config = json.loads((path / "config.json").read_text())
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (path / name).is_file():
                path = path / name
                break
        else:
            raise FileNotFoundError(f"{path}: no model.safetensors or pytorch_model.bin in this folder")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such weights file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        raw = load_file(str(path))
    else:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    return raw, hf_config


def _gpt2_tensors(raw: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """Tensors keyed without the ``transformer.`` prefix, lm_head and attention-mask buffers dropped."""
    state = {}
    for key, value in raw.items():
        key = key.removeprefix("transformer.")
        if key == "lm_head.weight" or key.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # lm_head is tied to wte; the others are causal-mask buffers, not weights
        state[key] = value.float()
    if "wte.weight" not in state or "wpe.weight" not in state:
        raise ValueError(f"{path}: not a GPT-2 checkpoint (no wte/wpe embeddings) "
                         "nor a Llama one (no model.embed_tokens)")
    return state
