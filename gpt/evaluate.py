"""Evaluating a GPT: validation loss and perplexity on token shards, and HellaSwag accuracy.

    python -m gpt.evaluate --checkpoint out/ckpt_0019073.pt --data data/fineweb --hellaswag hellaswag_val.jsonl
    python -m gpt.evaluate --hf-weights gpt2/ --hellaswag hellaswag_val.jsonl --limit 1000
    torchrun --nproc_per_node=8 -m gpt.evaluate --hf-weights gpt2/ --hellaswag hellaswag_val.jsonl

Validation loss: the mean next-token loss over the first ``--batches`` batches of the ``val``
shards (``gpt.training.evaluate``, the number training logs), and its perplexity ``exp(loss)``.
Without ``--data`` and ``--hellaswag`` it runs on the embedded corpus, as training does.

HellaSwag (Zellers et al., 2019): each example is a context and four endings, one of them right.
The file is the official ``hellaswag_val.jsonl`` (one JSON object per line with ``ctx``,
``endings`` (4 strings) and ``label`` (0-3)), read from the path given: nothing is downloaded.
Scoring follows build-nanogpt's and llm.c's GPT-2 evaluation: each ending is tokenized as
``" " + ending`` after the context's tokens, the model is run on context + ending, and only the
ending's tokens are scored, by their next-token cross-entropy. Then

* ``acc``: the ending with the lowest SUM of its tokens' losses (the highest log-likelihood),
* ``acc_norm``: the ending with the lowest MEAN loss per token (the sum divided by the ending's
  number of tokens; lm-evaluation-harness divides by characters instead, so its ``acc_norm``
  differs slightly).

GPT-2 124M scores about 0.295 ``acc_norm`` on the 10,042 validation examples this way. A context +
ending longer than the block size keeps its last ``block_size`` tokens. Examples are batched (all
four endings of ``batch_size`` examples, right-padded, in one forward) and, under torchrun, split
across ranks with the counts summed at the end.

``torch.compile``: HellaSwag's shapes change with every batch, so it runs the uncompiled module
(``gpt.generate.unwrap_model`` strips compile's and DDP's wrappers); the validation loss has
training's fixed shape and runs whatever module it is given, compiled or not.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from gpt.generate import add_model_arguments, model_from_args, unwrap_model
from gpt.training import autocast

ENDINGS = 4


class HellaSwagError(ValueError):
    """The HellaSwag file is missing or not in the official format."""


def load_hellaswag(path: str | Path, limit: int | None = None) -> list[dict]:
    """The examples of a HellaSwag ``.jsonl`` file as dicts with ``ctx``, ``endings``, ``label``
    (the first ``limit`` only, when given), each checked so a bad line is named, not mis-scored."""
    path = Path(path)
    if not path.is_file():
        raise HellaSwagError(f"{path}: no such HellaSwag file (give the path of hellaswag_val.jsonl)")
    examples = []
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if limit is not None and len(examples) >= limit:
                break
            if not line.strip():
                continue
            where = f"{path}, line {line_number}"
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as e:
                raise HellaSwagError(f"{where}: not a JSON object ({e})") from e
            examples.append(_check_example(raw, where))
    if not examples:
        raise HellaSwagError(f"{path}: no examples")
    return examples


def _check_example(raw, where: str) -> dict:
    if not isinstance(raw, dict) or not {"ctx", "endings", "label"} <= set(raw):
        raise HellaSwagError(f"{where}: expected an object with 'ctx', 'endings' and 'label'")
    ctx, endings, label = raw["ctx"], raw["endings"], raw["label"]
    if isinstance(label, str) and label.isdigit():
        label = int(label)
    if not isinstance(ctx, str) or not ctx:
        raise HellaSwagError(f"{where}: 'ctx' must be a non-empty string")
    if not (isinstance(endings, list) and len(endings) == ENDINGS and all(isinstance(e, str) and e for e in endings)):
        raise HellaSwagError(f"{where}: 'endings' must be a list of {ENDINGS} non-empty strings")
    if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < ENDINGS:
        raise HellaSwagError(f"{where}: 'label' must be an int in [0, {ENDINGS}), got {label!r}")
    return {"ctx": ctx, "endings": endings, "label": label}


def _rows(example: dict, block_size: int) -> list[tuple[list[int], int]]:
    """Per ending: (context + ending tokens, index of the ending's first token), cut to the block."""
    from gpt.tokenizer import encode

    context = encode(example["ctx"])
    rows = []
    for ending in example["endings"]:
        completion = encode(" " + ending)
        tokens = (context + completion)[-block_size:]
        # The first token of a window has no prediction: an ending cut by the window starts at 1.
        rows.append((tokens, max(1, len(tokens) - len(completion))))
    return rows


@torch.no_grad()
def score_endings(model, examples: list[dict], device: torch.device, dtype: torch.dtype = torch.float32):
    """(sum, mean) of each ending's per-token loss, both (len(examples), 4) fp32 tensors on the CPU.
    All endings go through the model in one right-padded batch; causal attention keeps the padding
    out of every scored position."""
    model = unwrap_model(model)
    rows = [row for example in examples for row in _rows(example, model.config.block_size)]
    width = max(len(tokens) for tokens, _ in rows)
    idx = torch.zeros((len(rows), width), dtype=torch.long)
    scored = torch.zeros((len(rows), width - 1), dtype=torch.bool)  # scored[r, j]: the loss predicting idx[r, j + 1]
    for r, (tokens, start) in enumerate(rows):
        idx[r, : len(tokens)] = torch.tensor(tokens)
        scored[r, start - 1 : len(tokens) - 1] = True
    idx, scored = idx.to(device), scored.to(device)
    with autocast(device, dtype):
        logits, _ = model(idx)
    losses = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), idx[:, 1:].flatten(), reduction="none")
    losses = losses.view(len(rows), width - 1) * scored
    sums = losses.sum(dim=1)
    means = sums / scored.sum(dim=1)
    return sums.view(-1, ENDINGS).cpu(), means.view(-1, ENDINGS).cpu()


def hellaswag_accuracy(model, path: str | Path, device: torch.device | str, dtype: torch.dtype = torch.float32,
                       limit: int | None = None, rank: int | None = None, world_size: int | None = None,
                       batch_size: int = 8, progress: bool = True) -> dict:
    """HellaSwag ``{"acc", "acc_norm", "n"}`` of ``model`` on the file at ``path`` (see the module doc).

    Example ``i`` is scored by rank ``i % world_size`` and the counts are summed across ranks, so
    every rank gets the totals. ``rank`` and ``world_size`` default to torch.distributed's when it is
    initialized (else 0 and 1); with world_size > 1 but no process group, the counts are this rank's
    share only. Every rank runs the same number of forwards (the shorter shares repeat an example
    that is not counted), as FSDP needs every rank in every forward. The model is left in the
    train/eval mode it came in.
    """
    device = torch.device(device)
    if world_size is None:
        world_size = dist.get_world_size() if dist.is_initialized() else 1
    if rank is None:
        rank = dist.get_rank() if dist.is_initialized() else 0
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside [0, world_size={world_size})")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    examples = load_hellaswag(path, limit)
    mine = examples[rank::world_size]
    share = math.ceil(len(examples) / world_size)
    counted = [True] * len(mine) + [False] * (share - len(mine))
    mine = mine + [examples[0]] * (share - len(mine))

    model = unwrap_model(model)
    was_training = model.training
    model.eval()
    counts = torch.zeros(3, dtype=torch.float64, device=device)  # examples, right by sum, right by mean
    try:
        for start in tqdm(range(0, share, batch_size), desc="hellaswag", unit="batch", dynamic_ncols=True,
                          disable=not progress or rank != 0):
            batch = mine[start : start + batch_size]
            keep = torch.tensor(counted[start : start + batch_size])
            sums, means = score_endings(model, batch, device, dtype)
            labels = torch.tensor([example["label"] for example in batch])
            counts[0] += keep.sum().item()
            counts[1] += ((sums.argmin(dim=1) == labels) & keep).sum().item()
            counts[2] += ((means.argmin(dim=1) == labels) & keep).sum().item()
    finally:
        model.train(was_training)
    if world_size > 1 and dist.is_initialized():
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
    n, right, right_norm = counts.tolist()
    return {"acc": right / n, "acc_norm": right_norm / n, "n": int(n)}


def validation_loss(model, data: str | Path, batch_size: int, seq_len: int, batches: int,
                    device: torch.device | str, dtype: torch.dtype = torch.float32) -> dict:
    """``{"val_loss", "val_perplexity"}``: training's validation loss over the first ``batches``
    batches of the ``val`` shards of ``data`` (averaged across ranks under torchrun)."""
    from gpt.data import DataLoader
    from gpt.training import evaluate

    device = torch.device(device)
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    config = unwrap_model(model).config
    if seq_len > config.block_size:
        raise ValueError(f"seq_len {seq_len} exceeds the model's block size {config.block_size}")
    loader = DataLoader(data, "val", batch_size, seq_len, rank=rank, world_size=world_size,
                        vocab_size=config.vocab_size)
    loss = evaluate(model, loader, batches, device, dtype)
    return {"val_loss": loss, "val_perplexity": math.exp(loss)}


# ----------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m gpt.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--data", help="folder (or glob) of token shards for the validation loss (default: the "
                                  "embedded corpus, unless only --hellaswag is asked for)")
    p.add_argument("--hellaswag", help="path of hellaswag_val.jsonl (the official format)")
    p.add_argument("--batches", type=int, default=20, help="validation batches")
    p.add_argument("--batch-size", type=int, default=8,
                   help="sequences per validation batch; HellaSwag examples per batch")
    p.add_argument("--seq-len", type=int, help="tokens per validation sequence (default: the block size)")
    p.add_argument("--limit", type=int, help="score only the first N HellaSwag examples")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object")
    return p.parse_args(argv)


def main(argv=None) -> int:
    from gpt import distributed
    from gpt.data import ensure_default_corpus

    args = parse_args(argv)
    try:
        dist_info, device = distributed.setup(args.device)
    except (ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    say = print if dist_info.is_main else (lambda *a, **k: None)
    try:
        model, dtype = model_from_args(args, device, "evaluation")
        results = {}
        data = args.data
        if data is None and args.hellaswag is None:
            data = ensure_default_corpus(verbose=dist_info.is_main) if dist_info.is_main else None
            if dist_info.enabled:
                data = distributed.broadcast_object(data)
        if data is not None:
            seq_len = args.seq_len or model.config.block_size
            results.update(validation_loss(model, data, args.batch_size, seq_len, args.batches, device, dtype))
            say(f"val loss {results['val_loss']:.4f}  perplexity {results['val_perplexity']:.2f}  "
                f"({args.batches} batches of {args.batch_size} x {seq_len} tokens x {dist_info.world_size} ranks)")
        if args.hellaswag is not None:
            scores = hellaswag_accuracy(model, args.hellaswag, device, dtype, limit=args.limit,
                                        batch_size=args.batch_size)
            results.update(hellaswag_acc=scores["acc"], hellaswag_acc_norm=scores["acc_norm"], hellaswag_n=scores["n"])
            say(f"hellaswag acc {scores['acc']:.4f}  acc_norm {scores['acc_norm']:.4f}  ({scores['n']} examples)")
        if args.json:
            say(json.dumps(results))
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        distributed.teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
