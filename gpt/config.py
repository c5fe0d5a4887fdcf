"""Model configurations: GPT-2's four sizes, the Llama-style presets, and small presets that train on a CPU."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

GPT2_VOCAB_SIZE = 50257


ARCHITECTURES = ("gpt2", "llama")


@dataclass(frozen=True)
class GPTConfig:
    """One config for both architectures. ``gpt2``: learned positions, LayerNorm, GELU MLP, biases,
    tied embeddings. ``llama``: RoPE, RMSNorm, SwiGLU MLP, grouped-query attention, no biases,
    untied embeddings. ``bias`` and ``tie_embeddings`` left None take their architecture's default;
    ``n_kv_head`` and ``mlp_hidden`` left None follow ``n_head`` and ``n_embd`` (``kv_heads``, ``mlp_width``)."""

    block_size: int = 1024  # longest sequence: the position embedding's (gpt2) or RoPE table's (llama) length
    vocab_size: int = GPT2_VOCAB_SIZE  # real tokens; the loss and sampling never see the padding
    vocab_pad_multiple: int = 64  # embedding rows padded to a multiple of this (50257 -> 50304) for faster matmuls
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool | None = None  # biases in the Linear (and LayerNorm) layers: gpt2 True, llama False
    arch: str = "gpt2"
    n_kv_head: int | None = None  # key/value heads (grouped-query attention, llama only); None: n_head
    mlp_hidden: int | None = None  # the MLP's hidden width (llama: SwiGLU's); None: 4·n_embd
    rope_theta: float = 10000.0  # llama: RoPE's base
    norm_eps: float = 1e-5  # LayerNorm's / RMSNorm's epsilon
    tie_embeddings: bool | None = None  # lm_head shares wte's weight: gpt2 True, llama False

    def __post_init__(self):
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"GPTConfig.arch must be one of {', '.join(ARCHITECTURES)}, got {self.arch!r}")
        llama = self.arch == "llama"
        for name, value in dict(bias=not llama, tie_embeddings=not llama).items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)  # frozen: resolved once, so to_dict() is explicit
        for name in ("block_size", "vocab_size", "vocab_pad_multiple", "n_layer", "n_head", "n_embd", "kv_heads",
                     "mlp_width"):
            if getattr(self, name) < 1:
                raise ValueError(f"GPTConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps must be > 0, got {self.norm_eps}")
        if self.n_head % self.kv_heads:
            raise ValueError(f"n_kv_head ({self.kv_heads}) must divide n_head ({self.n_head})")
        if not llama and self.kv_heads != self.n_head:
            raise ValueError(f"gpt2 has no grouped-query attention: n_kv_head must be None or n_head ({self.n_head}), "
                             f"got {self.n_kv_head} (use arch='llama')")
        if llama and self.head_dim % 2:
            raise ValueError(f"llama: RoPE needs an even head dim, got n_embd/n_head = {self.head_dim}")
        if llama and not self.rope_theta > 0:
            raise ValueError(f"rope_theta must be > 0, got {self.rope_theta}")

    @property
    def kv_heads(self) -> int:
        """Key/value heads: ``n_kv_head``, or ``n_head`` (no grouping) when it is None."""
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def mlp_width(self) -> int:
        """The MLP's hidden width: ``mlp_hidden``, or 4·n_embd when it is None."""
        return 4 * self.n_embd if self.mlp_hidden is None else self.mlp_hidden

    @property
    def padded_vocab_size(self) -> int:
        m = self.vocab_pad_multiple
        return (self.vocab_size + m - 1) // m * m

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "GPTConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown GPTConfig fields {sorted(unknown)}; expected a subset of {sorted(known)}")
        return cls(**values)


PRESETS: dict[str, GPTConfig] = {
    "gpt2": GPTConfig(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": GPTConfig(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": GPTConfig(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": GPTConfig(n_layer=48, n_head=25, n_embd=1600),  # 1558M
    # CPU presets: the GPT-2 vocabulary still dominates their size (the embedding is tied to lm_head).
    "tiny": GPTConfig(block_size=128, n_layer=4, n_head=4, n_embd=128),
    "small": GPTConfig(block_size=256, n_layer=6, n_head=6, n_embd=384),
    # The Llama block (RMSNorm, RoPE, SwiGLU, grouped-query attention) on GPT-2's padded vocabulary.
    # llama-124m sits next to gpt2 (124M) for comparisons on the same data and budget: its SwiGLU's
    # three matrices at hidden 2048 cost what GPT-2's two at 3072 do, and 4 KV heads shrink K/V.
    "llama-tiny": GPTConfig(arch="llama", block_size=128, n_layer=4, n_head=4, n_kv_head=2, n_embd=128,
                            mlp_hidden=384),
    "llama-124m": GPTConfig(arch="llama", n_layer=12, n_head=12, n_kv_head=4, n_embd=768, mlp_hidden=2048),
    "llama-1b": GPTConfig(arch="llama", block_size=2048, n_layer=16, n_head=32, n_kv_head=8, n_embd=2048,
                          mlp_hidden=8192, rope_theta=500000.0),
}


def preset(name: str, **overrides) -> GPTConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return GPTConfig.from_dict({**PRESETS[name].to_dict(), **overrides})
