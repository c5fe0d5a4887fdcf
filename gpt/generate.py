"""Sampling from a GPT: batched prompts of any lengths, a KV cache, temperature, top-k and top-p.

    python -m gpt.generate --hf-weights gpt2/ --prompt "Hello, I'm a language model," --num-samples 4
    python -m gpt.generate --checkpoint out/ckpt_0019073.pt --prompt "def " --prompt "import" --temperature 0
    python -m gpt.generate --hf-weights gpt2/ --prompt "The" --benchmark     # tokens/s with and without the cache

How a batch of prompts of different lengths runs: the prompts are right-padded into one (B, T)
batch and prefilled at once. Causal attention keeps the padding out of every prompt position, so
each row's keys and values are exactly its own; row ``b``'s first new token is read at its own last
prompt position, and from then on every row writes its next token at its own position
``lengths[b]`` (per-row positions, no left-padding). The padding's cache slots are never read (the
decode attention stops at each row's length) and are overwritten as the row grows.

With the cache (the default) the prompt is run once and each new token costs one position's work.
GPT-2's positions are absolute, so a cache cannot slide past the block size: once the longest row
fills the block, generation goes on without the cache, each step re-running the last ``block_size``
tokens of every row (the cache-free path, which is also the reference the tests compare the cache
against: in fp32 with greedy decoding both give the same tokens).

Sampling: ``temperature == 0`` is greedy (argmax); otherwise the logits are divided by the
temperature, cut to the ``top_k`` most likely tokens, then to the smallest set whose probability
reaches ``top_p`` (nucleus), and one token is drawn with ``generator``, a ``torch.Generator`` of
its own, so a sample taken during training never moves training's random stream. A row stops at
``stop_token`` (``<|endoftext|>`` for the command line); the batch stops when every row has.

``torch.compile``: generation always runs the uncompiled module (``unwrap_model`` strips compile's
and DDP's wrappers): its shapes change every step, and a compiled graph would recompile for each.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from gpt.model import GPT, KVCache


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under ``torch.compile``'s and DistributedDataParallel's wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):  # torch.compile's OptimizedModule
            model = model._orig_mod
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


# ----------------------------------------------------------------------------------------------------
# Sampling one token


def _check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0: greedy), got {temperature}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 0):
        raise ValueError(f"top_k must be None or an int >= 0 (0 or None: off), got {top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be None or in (0, 1] (1 or None: off), got {top_p}")


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """``logits`` (B, V) with every token outside the top-k and outside the nucleus set to -inf.

    The nucleus is the smallest set of most likely tokens whose probability reaches ``top_p``: a
    token stays when the tokens strictly more likely than it hold less than ``top_p``, so the most
    likely token always stays. ``top_k`` of 0 or None and ``top_p`` of 1 or None are off.
    """
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs
        drop_sorted = mass_before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token id per row of ``logits`` (B, V), as int64 (B,). See the module doc."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(filter_logits(logits / temperature, top_k, top_p), dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)[:, 0]


# ----------------------------------------------------------------------------------------------------
# Generating


def _window_logits(model: GPT, tokens: torch.Tensor, lengths: torch.Tensor, longest: int) -> torch.Tensor:
    """Cache-free: the next-token logits (B, V) of each row from its last ``block_size`` tokens.

    Row ``b``'s window starts at ``max(0, lengths[b] - block_size)`` and, like the prefill, is
    right-padded (with whatever ``tokens`` holds there) to the widest window."""
    block_size = model.config.block_size
    width = min(block_size, longest)
    start = (lengths - block_size).clamp_min(0)
    columns = (start[:, None] + torch.arange(width, device=tokens.device)).clamp_max(tokens.shape[1] - 1)
    logits, _ = model(tokens.gather(1, columns))
    return logits[torch.arange(tokens.shape[0], device=tokens.device), lengths - start - 1]


@torch.no_grad()
def generate_tokens(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    stop_token: int | None = None,
    use_kv_cache: bool = True,
    on_step: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
) -> list[list[int]]:
    """The new tokens of each prompt (lists of token ids, any lengths), ``stop_token`` included
    when a row hits it. ``on_step(tokens, active)`` is called after every step with that step's
    token of each row (B,) and whether each row was still generating (B,) bool (for streaming).
    Prompts longer than the block size are cut to their last ``block_size`` tokens (cache-free)."""
    _check_sampling(temperature, top_k, top_p)
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generation needs at least one prompt, and every prompt at least one token")
    model = unwrap_model(model)
    config = model.config
    device = next(model.parameters()).device
    B = len(prompts)
    prompt_lengths = [len(p) for p in prompts]
    longest_prompt = max(prompt_lengths)
    # Every row's tokens so far, right-padded (the padding is never attended to; see the module doc).
    tokens = torch.zeros((B, longest_prompt + max_new_tokens), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        tokens[row, : len(prompt)] = torch.as_tensor(prompt, dtype=torch.long)
    if int(tokens.min()) < 0 or int(tokens.max()) >= config.vocab_size:
        raise ValueError(f"prompt token ids must lie in [0, vocab_size={config.vocab_size})")
    tokens = tokens.to(device)
    lengths = torch.tensor(prompt_lengths, device=device)
    longest = longest_prompt  # max(lengths), on the host
    # Positions the cache must hold: every token but the last one generated (which is never fed back).
    cache_len = min(config.block_size, longest_prompt + max_new_tokens - 1)
    cache = None
    if use_kv_cache and max_new_tokens > 0 and longest_prompt <= cache_len:
        cache = KVCache(config, B, cache_len, device)
    rows = torch.arange(B, device=device)
    active = torch.ones(B, dtype=torch.bool, device=device)
    next_token = None  # each row's last sampled token: the input of the next decode step

    was_training = model.training
    model.eval()
    try:
        for step in range(max_new_tokens):
            if cache is not None and cache.longest == cache.max_len:
                cache = None  # the block is full: slide the window from now on, without the cache
            if cache is None:
                logits = _window_logits(model, tokens, lengths, longest)
            elif step == 0:
                logits, _ = model(tokens[:, :longest_prompt], kv_cache=cache, prompt_lengths=lengths)
            else:
                logits, _ = model(next_token[:, None], kv_cache=cache)
            next_token = sample_next(logits, temperature, top_k, top_p, generator)
            if stop_token is not None:
                next_token = torch.where(active, next_token, stop_token)  # finished rows only pad
            tokens[rows, lengths] = next_token
            lengths += 1
            longest += 1
            if on_step is not None:
                on_step(next_token, active)
            if stop_token is not None:
                active &= next_token != stop_token
                if not active.any():
                    break
    finally:
        model.train(was_training)

    steps = longest - longest_prompt
    completions = []
    for row, sequence in enumerate(tokens.tolist()):
        completion = sequence[prompt_lengths[row] : prompt_lengths[row] + steps]
        if stop_token is not None and stop_token in completion:
            completion = completion[: completion.index(stop_token) + 1]
        completions.append(completion)
    return completions


@torch.no_grad()
def generate(model, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
             generator: torch.Generator | None = None, *, top_p: float | None = None,
             stop_token: int | None = None, use_kv_cache: bool = True):
    """Append up to ``max_new_tokens`` sampled tokens to ``idx`` (B, T); returns (B, T + n).
    ``temperature == 0`` is greedy. Rows that hit ``stop_token`` are padded with it; n is smaller
    than ``max_new_tokens`` only when every row stopped.

    ``generator`` keeps sampling off the global RNG, so a sample in the middle of training never
    changes the run that follows it.
    """
    if idx.dim() != 2:
        raise ValueError(f"idx must be a (B, T) tensor of token ids, got shape {tuple(idx.shape)}")
    completions = generate_tokens(
        model, idx.tolist(), max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
        generator=generator, stop_token=stop_token, use_kv_cache=use_kv_cache,
    )
    width = max(len(c) for c in completions)
    pad = stop_token if stop_token is not None else 0
    new = [c + [pad] * (width - len(c)) for c in completions]
    return torch.cat((idx, torch.tensor(new, dtype=idx.dtype, device=idx.device).view(len(new), width)), dim=1)


def measure_tokens_per_second(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
                              use_kv_cache: bool, dtype: torch.dtype = torch.float32, repeats: int = 1) -> float:
    """New tokens per second of greedy generation (no stop token, so every row runs to the end),
    after one warm-up run (kernel compilation, allocator); the best of ``repeats`` timed runs."""
    from gpt.training import autocast

    device = next(unwrap_model(model).parameters()).device
    best = float("inf")
    for run in range(repeats + 1):
        _synchronize(device)
        start = time.perf_counter()
        with autocast(device, dtype):
            generate_tokens(model, prompts, max_new_tokens, temperature=0.0, use_kv_cache=use_kv_cache)
        _synchronize(device)
        if run > 0:
            best = min(best, time.perf_counter() - start)
    return len(prompts) * max_new_tokens / best


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------------------
# Loading a model, and the command line


def load_model(checkpoint: str | Path | None = None, hf_weights: str | Path | None = None,
               device: torch.device | str = "cpu") -> GPT:
    """A GPT in eval mode from one of our checkpoints (a ``ckpt_*.pt`` file of gpt/checkpoint.py, or
    a ``ckpt_*.dcp`` folder of an --fsdp run) or from GPT-2 weights in the HuggingFace layout (a
    ``.safetensors``/``.bin`` file or a folder holding one). Nothing is downloaded."""
    from gpt.checkpoint import load_checkpoint
    from gpt.config import GPTConfig

    if (checkpoint is None) == (hf_weights is None):
        raise ValueError("give exactly one of a checkpoint (--checkpoint) and HuggingFace weights (--hf-weights)")
    if hf_weights is not None:
        model = GPT.from_pretrained(hf_weights)
    else:
        path = Path(checkpoint)
        if path.is_dir():
            state = _load_sharded_checkpoint(path)
        elif path.is_file():
            state = load_checkpoint(path)
        else:
            raise FileNotFoundError(f"{path}: no such checkpoint")
        model = GPT(GPTConfig.from_dict(state["config"]))
        model.load_state_dict(state["model"])
    return model.to(device).eval()


def _load_sharded_checkpoint(path: Path) -> dict:
    """An --fsdp run's ``ckpt_*.dcp`` folder, gathered into one process: ``{"model", "config"}``.
    Checked against its manifest, and read without unpickling anything but tensors and plain types."""
    from gpt import checkpoint as ckpt
    from gpt.distributed import load_sharded_model_state

    if not (path / "extra.pt").is_file():
        raise ValueError(f"{path}: a folder, but not a sharded checkpoint of ours (no extra.pt)")
    if ckpt.folder_manifest_path(path).is_file():  # as for a .pt file: one copied without its manifest still loads
        ckpt.verify_folder(path)
    extra = ckpt.load_state_file(path / "extra.pt")
    return {"model": load_sharded_model_state(path), "config": extra["config"]}


class _Streamer:
    """Prints one sequence's text as its tokens arrive. A token can end inside a multi-byte
    character, so text is printed up to the last complete character only."""

    def __init__(self, decode: Callable[[list[int]], str], stop_token: int | None):
        self.decode, self.stop_token = decode, stop_token
        self.tokens: list[int] = []
        self.printed = 0

    def __call__(self, next_token: torch.Tensor, active: torch.Tensor) -> None:
        token = int(next_token[0])
        if not bool(active[0]) or token == self.stop_token:
            return
        self.tokens.append(token)
        text = self.decode(self.tokens).rstrip("\ufffd")
        print(text[self.printed :], end="", flush=True)
        self.printed = len(text)


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The options of every command that loads a model (:func:`model_from_args` reads them): where
    its weights come from, the device, the autocast dtype and the kernels."""
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a checkpoint of ours: ckpt_*.pt (or an --fsdp run's ckpt_*.dcp folder)")
    source.add_argument("--hf-weights", help="GPT-2 weights in the HuggingFace layout: .safetensors/.bin or a folder")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], help="autocast dtype (default: bfloat16 on CUDA)")
    p.add_argument("--kernels", help="ops on Triton, as for train_gpt2.py (default: $GPT_KERNELS, else all)")


def model_from_args(args: argparse.Namespace, device: torch.device, task: str) -> tuple[GPT, torch.dtype]:
    """The model and the autocast dtype that :func:`add_model_arguments`' options ask for, with
    the kernels they name switched on; ``task`` names the command's work in the dtype's error."""
    from gpt_kernels import registry

    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    if device.type == "cpu" and dtype != torch.float32:
        raise ValueError(f"--dtype {args.dtype} needs CUDA; on the CPU {task} runs in float32")
    if args.kernels is not None:
        registry.set_kernels(args.kernels)
    return load_model(args.checkpoint, args.hf_weights, device), dtype


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m gpt.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--prompt", action="append", help="a prompt (repeat for a batch; default: an unconditional "
                                                     "sample, starting from <|endoftext|>)")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
    p.add_argument("--top-k", type=int, default=50, help="keep the k most likely tokens (0: off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep the smallest set of tokens "
                                                            "whose probability reaches p (1: off)")
    p.add_argument("--num-samples", type=int, default=1, help="samples per prompt")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--no-kv-cache", action="store_true", help="re-run the whole sequence for every token")
    p.add_argument("--benchmark", action="store_true", help="time greedy generation (max-new-tokens per row, "
                                                            "no early stop) with and without the KV cache")
    return p.parse_args(argv)


def main(argv=None) -> int:
    from gpt.tokenizer import EOT_TOKEN, decode, encode
    from gpt.training import autocast
    from gpt_kernels import registry

    args = parse_args(argv)
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if args.num_samples < 1:
            raise ValueError(f"--num-samples must be >= 1, got {args.num_samples}")
        _check_sampling(args.temperature, args.top_k, args.top_p)
        model, dtype = model_from_args(args, device, "generation")
        texts = args.prompt or [None]
        prompts = [encode(text) if text is not None else [EOT_TOKEN] for text in texts]
        block_size = model.config.block_size
        for text, prompt in zip(texts, prompts):
            if not prompt:
                raise ValueError("an empty prompt has no token to continue from (leave --prompt out for an "
                                 "unconditional sample)")
            if len(prompt) > block_size:
                raise ValueError(f"the prompt {text[:40]!r}... is {len(prompt)} tokens, longer than the "
                                 f"model's block size {block_size}")
        batch = [prompt for prompt in prompts for _ in range(args.num_samples)]
        labels = [text for text in texts for _ in range(args.num_samples)]

        if args.benchmark:
            for use_cache in (True, False):
                rate = measure_tokens_per_second(model, batch, args.max_new_tokens, use_kv_cache=use_cache, dtype=dtype)
                print(f"{'with' if use_cache else 'without'} the KV cache: {rate:,.1f} tokens/s ({len(batch)} rows x "
                      f"{args.max_new_tokens} new tokens, greedy, {device}, {str(dtype).removeprefix('torch.')})")
            print(registry.report(device))
            return 0

        generator = torch.Generator(device=device).manual_seed(args.seed)
        stream = len(batch) == 1
        if stream and labels[0] is not None:
            print(labels[0], end="", flush=True)
        with autocast(device, dtype):
            completions = generate_tokens(
                model, batch, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, generator=generator, stop_token=EOT_TOKEN, use_kv_cache=not args.no_kv_cache,
                on_step=_Streamer(decode, EOT_TOKEN) if stream else None,
            )
        if stream:
            print()
            return 0
        for i, (label, completion) in enumerate(zip(labels, completions)):
            text = decode([t for t in completion if t != EOT_TOKEN])
            print(f"--- sample {i + 1} of {len(batch)} ---")
            print((label or "") + text)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
