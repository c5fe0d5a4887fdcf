"""Train GPT-2 with switchable Triton kernels.

    python train_gpt2.py                       # GPU: GPT-2 124M, every Triton kernel; CPU: the tiny preset
    python train_gpt2.py --preset gpt2 --data DIR --kernels all,-attention --compile

Without --data it trains on the embedded corpus (the Python standard library's sources, tokenized
on first use). Run ``python train_gpt2.py --help`` for every option.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import warnings
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from gpt import checkpoint as ckpt
from gpt import distributed
from gpt.config import PRESETS, preset
from gpt.data import DataLoader, ensure_default_corpus
from gpt.evaluate import hellaswag_accuracy
from gpt.generate import generate
from gpt.model import GPT
from gpt.numerics import ON_NONFINITE, StepGuard
from gpt.tokenizer import decode, encode
from gpt.training import (
    TrainingStep,
    autocast,
    cosine_lr,
    datasheet_peak_flops,
    evaluate,
    make_optimizer,
    rng_state,
    set_rng_state,
)
from gpt_kernels import registry

# What a run does when an option is left out: a real GPT-2 124M run on a GPU (build-nanogpt's
# 10B-token schedule, 0.5M tokens per step); a few-minute run of the tiny preset on a CPU.
GPU_DEFAULTS = dict(preset="gpt2", batch_size=16, seq_len=1024, total_batch_tokens=524288, max_steps=19073,
                    lr=6e-4, warmup_steps=715, eval_every=250, eval_batches=20, sample_every=1000,
                    checkpoint_every=1000, dtype="bfloat16")
CPU_DEFAULTS = dict(preset="tiny", batch_size=8, seq_len=128, total_batch_tokens=None, max_steps=300,
                    lr=2e-3, warmup_steps=20, eval_every=50, eval_batches=8, sample_every=0,
                    checkpoint_every=0, dtype="float32")

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=list(PRESETS), help="model size (default: gpt2 on a GPU, tiny on a CPU)")
    p.add_argument("--data", help="folder (or glob) of token shards; default: the embedded corpus")
    p.add_argument("--max-steps", type=int, help="optimizer steps")
    p.add_argument("--batch-size", type=int, help="sequences per micro-batch")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (at most the preset's block size)")
    p.add_argument("--total-batch-tokens", type=int,
                   help="tokens per optimizer step; gradient accumulation = this / (batch-size * seq-len)")
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="final lr as a fraction of the peak")
    p.add_argument("--warmup-steps", type=int, help="linear warm-up steps")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0, help="clip the global gradient norm to this (0: off)")
    p.add_argument("--kernels", help="ops on Triton: 'all', 'none', or a list such as 'layernorm,attention' "
                                     "or 'all,-gelu' (default: $GPT_KERNELS, else all)")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", choices=list(DTYPES), help="autocast dtype (default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--fsdp", action="store_true", help="shard parameters, gradients and optimizer state across "
                                                       "ranks (FSDP2; under torchrun), with sharded checkpoints")
    p.add_argument("--eval-every", type=int, help="validation loss every N steps (0: only at the end)")
    p.add_argument("--eval-batches", type=int, help="batches per validation")
    p.add_argument("--hellaswag", help="HellaSwag jsonl file (official format, local): accuracy at each evaluation")
    p.add_argument("--sample-every", type=int, help="print a sample every N steps (0: only at the end)")
    p.add_argument("--sample-prompt", default="def ", help="prompt for the samples")
    p.add_argument("--sample-tokens", type=int, default=48, help="tokens per sample")
    p.add_argument("--checkpoint-every", type=int, help="checkpoint every N steps (0: only at the end)")
    p.add_argument("--keep-last", type=int, default=2, help="complete checkpoints kept in --out-dir (0: all)")
    p.add_argument("--out-dir", default="out", help="checkpoints and log.jsonl go here")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out-dir")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--dropout", type=float, default=0.0, help="dropout probability (0: off, as for GPT-2 pretraining)")
    # The numerics watch (gpt/numerics.py): a skipped step leaves the weights and optimizer untouched.
    p.add_argument("--on-nonfinite", choices=ON_NONFINITE, default="skip",
                   help="a NaN/inf loss or gradient norm skips the step, or stops the run (default: skip)")
    p.add_argument("--max-consecutive-skips", type=int, default=10,
                   help="stop after this many skipped steps in a row, non-finite or spikes (0: never)")
    p.add_argument("--spike-zscore", type=float, default=6.0,
                   help="skip a step whose loss z-score over the last --spike-window losses exceeds this (0: off)")
    p.add_argument("--spike-window", type=int, default=128, help="losses the spike guard compares against")
    args = p.parse_args(argv)

    for name, least in (("batch_size", 1), ("seq_len", 1), ("total_batch_tokens", 1), ("max_steps", 0),
                        ("warmup_steps", 0), ("eval_every", 0), ("eval_batches", 1), ("sample_every", 0),
                        ("sample_tokens", 0), ("checkpoint_every", 0), ("keep_last", 0),
                        ("max_consecutive_skips", 0), ("spike_zscore", 0), ("spike_window", 2)):
        value = getattr(args, name)
        if value is not None and not value >= least:
            p.error(f"--{name.replace('_', '-')} must be >= {least}, got {value}")
    if not args.sample_prompt:
        p.error("--sample-prompt must not be empty: a sample continues its text")
    if args.device:
        try:
            torch.device(args.device)
        except RuntimeError:
            p.error(f"--device {args.device!r} is not a device (expected cuda, cuda:N or cpu)")
    device_type = torch.device(args.device).type if args.device else ("cuda" if torch.cuda.is_available() else "cpu")
    defaults = GPU_DEFAULTS if device_type == "cuda" else CPU_DEFAULTS
    for name, value in defaults.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    return args


class RunError(ValueError):
    """A problem with the run's options, reported as one line."""


def main(argv=None) -> int:
    args = parse_args(argv)
    dist_info, device = distributed.setup(args.device)
    try:
        code = train(args, dist_info, device)
        distributed.barrier()  # ranks leave together: gloo aborts one that tears down while another is busy
        return code
    finally:
        distributed.teardown()


def train(args, dist_info: distributed.DistInfo, device: torch.device) -> int:
    say = print if dist_info.is_main else _silent
    dtype = _autocast_dtype(args, device)
    if args.kernels is not None:
        registry.set_kernels(args.kernels)  # otherwise $GPT_KERNELS (read at import), else all
    # The table printed below says which ops fell back to their reference and why: no warning per op.
    warnings.filterwarnings("ignore", message="kernel .* runs its PyTorch reference")
    config = preset(args.preset, dropout=args.dropout)
    grad_accum, total = _batch_plan(args, config, dist_info)
    data = _training_data(args, dist_info)
    loader_args = dict(rank=dist_info.rank, world_size=dist_info.world_size, seed=args.seed, vocab_size=config.vocab_size)
    train_loader = DataLoader(data, "train", args.batch_size, args.seq_len, **loader_args)
    val_loader = DataLoader(data, "val", args.batch_size, args.seq_len, **loader_args)

    torch.manual_seed(args.seed)
    model = GPT(config).to(device)
    if args.fsdp:
        _shard(model, dist_info, device)
    optimizer = make_optimizer(model, args.lr, args.weight_decay)
    guard = StepGuard(args.on_nonfinite, args.max_consecutive_skips, args.spike_zscore, args.spike_window)
    out_dir = Path(args.out_dir)
    _check_out_dir(out_dir)
    start_step = _resume(args, out_dir, config, model, optimizer, train_loader, guard, dist_info)
    train_model = _wrap(model, args, dist_info, device)  # DDP and torch.compile, when asked for
    if dist_info.is_main:
        _print_header(args, config, model, device, dtype, grad_accum, total, data, dist_info)
        _print_schedule(args, total, train_loader.num_tokens)
    training_step = TrainingStep(train_model, optimizer, train_loader.next_batch, grad_accum, device, dtype,
                                 args.grad_clip, guard)
    step_s_at_peak = _step_seconds_at_peak(model, args.seq_len, total, device, dist_info.world_size)
    sampler = torch.Generator(device=device).manual_seed(args.seed)

    progress = tqdm(range(start_step, args.max_steps), initial=start_step, total=args.max_steps,
                    dynamic_ncols=True, disable=None if dist_info.is_main else True)
    write = progress.write if dist_info.is_main else _silent
    with (open(out_dir / "log.jsonl", "a") if dist_info.is_main else contextlib.nullcontext()) as log:
        for step in progress:
            record = {"step": step}
            record.update(_evaluate_and_sample(step, args, model, train_model, val_loader, sampler, device, dtype, write))

            start = time.perf_counter()
            lr = cosine_lr(step, args.lr, args.lr * args.min_lr_ratio, args.warmup_steps, args.max_steps)
            result = training_step(step, lr)
            elapsed = time.perf_counter() - start

            record.update(_step_record(result, lr, elapsed, total, step_s_at_peak, guard))
            if result.verdict.skip_reason:
                write(result.verdict.message)
            progress.set_postfix(_postfix(record), refresh=False)
            _append(log, record)
            if result.verdict.stop:
                raise RunError(result.verdict.stop)
            done = step + 1
            if (args.checkpoint_every and done % args.checkpoint_every == 0) or done == args.max_steps:
                _save_checkpoint(args, out_dir, done, config, model, optimizer, train_loader, guard, dist_info)

        final = {"step": args.max_steps, "val_loss": evaluate(train_model, val_loader, args.eval_batches, device, dtype)}
        _append(log, final)
    say(f"step {args.max_steps}: val loss {final['val_loss']:.4f}" + (f" ({guard.summary()})" if guard.skipped else ""))
    say("sample:\n" + _sample(model, args, sampler, device, dtype))
    return 0


def _autocast_dtype(args, device: torch.device) -> torch.dtype:
    """The run's autocast dtype, once the device can run it; TF32 matmuls on CUDA."""
    dtype = DTYPES[args.dtype]
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RunError(f"--device {args.device}: no CUDA GPU is available here (use --device cpu)")
    if device.type == "cpu" and dtype != torch.float32:
        raise RunError(f"--dtype {args.dtype} needs CUDA; on the CPU training runs in float32")
    return dtype


def _batch_plan(args, config, dist_info) -> tuple[int, int]:
    """(micro-steps per optimizer step, tokens per optimizer step) from --total-batch-tokens."""
    if args.seq_len > config.block_size:
        raise RunError(f"--seq-len {args.seq_len} exceeds the {args.preset} preset's block size {config.block_size}")
    tokens_per_micro = args.batch_size * args.seq_len * dist_info.world_size
    total = args.total_batch_tokens or tokens_per_micro
    if total % tokens_per_micro:
        raise RunError(f"--total-batch-tokens {total} is not a multiple of batch-size*seq-len*world-size = "
                       f"{args.batch_size}*{args.seq_len}*{dist_info.world_size} = {tokens_per_micro}")
    return total // tokens_per_micro, total


def _training_data(args, dist_info) -> str:
    """--data, or the embedded corpus (prepared on first use by rank 0, the others wait for it)."""
    data = args.data or (ensure_default_corpus() if dist_info.is_main else None)
    if dist_info.enabled and not args.data:
        data = distributed.broadcast_object(data)
    return data


def _resume(args, out_dir: Path, config, model, optimizer, train_loader, guard, dist_info) -> int:
    """With --resume, load the newest complete checkpoint (model, optimizer, data position, random
    generators, numerics guard) and drop the log records of the steps to redo; returns the step to
    start from. A run that starts from step 0 starts a fresh log."""
    say = print if dist_info.is_main else _silent
    log_path = out_dir / "log.jsonl"
    found = _latest_checkpoint(args, out_dir) if args.resume else None
    if not found:
        if args.resume:
            say(f"--resume: no checkpoint in {out_dir}, starting from step 0")
        if dist_info.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
            log_path.unlink(missing_ok=True)
        return 0
    path, state = found
    ckpt.check_compatible(state["config"], config, path)
    if args.fsdp:
        state.update(distributed.load_sharded_checkpoint(path, model, optimizer))
    else:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    train_loader.load_state_dict(state["train_loader"])
    set_rng_state(state["rng"])
    if "numerics" in state:
        guard.load_state_dict(state["numerics"])
    say(f"resuming from {path} at step {state['step']}")
    if dist_info.is_main:
        _truncate_log(log_path, state["step"])
    return state["step"]


def _save_checkpoint(args, out_dir: Path, step: int, config, model, optimizer, train_loader, guard, dist_info) -> None:
    """Everything a resumed run needs to continue exactly: --fsdp runs write sharded checkpoints
    (every rank its shards), others one file (rank 0)."""
    state = dict(step=step, train_loader=train_loader.state_dict(), rng=rng_state(), config=config.to_dict(),
                 args={k: str(v) for k, v in vars(args).items()}, numerics=guard.state_dict())
    if args.fsdp:
        distributed.save_sharded_checkpoint(out_dir, step, model, optimizer, state, args.keep_last)
    elif dist_info.is_main:
        state.update(model=model.state_dict(), optimizer=optimizer.state_dict())
        ckpt.save_checkpoint(out_dir, step, state, keep_last=args.keep_last)


def _wrap(model, args, dist_info, device: torch.device):
    """What runs the training forward: DDP around the model when distributed without --fsdp (it
    averages the gradients across ranks in the backward), torch.compile around that with --compile."""
    if dist_info.enabled and not args.fsdp:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    return torch.compile(model) if args.compile else model


def _evaluate_and_sample(step: int, args, model, train_model, val_loader, sampler, device, dtype, write) -> dict:
    """At the steps --eval-every and --sample-every name: the validation loss (and the HellaSwag
    accuracy) for the step's log record, and a sample, each written as one message."""
    record = {}
    if args.eval_every and step % args.eval_every == 0:
        record["val_loss"] = evaluate(train_model, val_loader, args.eval_batches, device, dtype)
        message = f"step {step}: val loss {record['val_loss']:.4f}"
        if args.hellaswag:  # every rank: the examples are split across them
            scores = hellaswag_accuracy(model, args.hellaswag, device, dtype, progress=False)
            record.update(hellaswag_acc=scores["acc"], hellaswag_acc_norm=scores["acc_norm"])
            message += f", HellaSwag acc {scores['acc']:.4f} (acc_norm {scores['acc_norm']:.4f})"
        write(message)
    if args.sample_every and step > 0 and step % args.sample_every == 0:
        write(_sample(model, args, sampler, device, dtype))  # every rank: FSDP's forward needs them all
    return record


def _step_seconds_at_peak(model, seq_len: int, tokens_per_step: int, device, world_size: int) -> float | None:
    """How long a step's FLOPs take at the GPUs' datasheet peak (None where it is unknown): MFU is
    that over the measured step time."""
    peak = datasheet_peak_flops(device)
    return model.flops_per_token(seq_len) * tokens_per_step / (peak * world_size) if peak else None


def _step_record(result, lr: float, elapsed: float, tokens: int, step_s_at_peak: float | None, guard) -> dict:
    """The step's figures for the log."""
    record = dict(train_loss=result.loss, lr=lr, grad_norm=result.grad_norm, tokens_per_sec=tokens / elapsed,
                  step_ms=elapsed * 1e3, skipped_steps=guard.skipped)
    if result.verdict.zscore is not None:
        record["loss_z"] = result.verdict.zscore
    if result.verdict.skip_reason:
        record["skipped"] = result.verdict.skip_reason
    if step_s_at_peak:
        record["mfu"] = step_s_at_peak / elapsed
    return record


def _postfix(record: dict) -> dict:
    """The progress bar's figures."""
    return dict(loss=f"{record['train_loss']:.4f}", lr=f"{record['lr']:.2e}", tok_s=f"{record['tokens_per_sec']:,.0f}",
                mfu=f"{record['mfu']:.1%}" if "mfu" in record else "n/a")


def _append(log, record: dict) -> None:
    if log:
        log.write(json.dumps(record) + "\n")
        log.flush()


def _shard(model, dist_info, device: torch.device) -> None:
    """FSDP2: each block is one unit of all-gather / reduce-scatter; the root holds the embeddings
    (wte and the tied lm_head stay together) and the final LayerNorm."""
    if not dist_info.enabled:
        raise RunError("--fsdp needs torch.distributed: launch with torchrun --nproc_per_node=N")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    # Without a mesh FSDP2 takes the machine's accelerator, even for a --device cpu run.
    mesh = init_device_mesh(device.type, (dist_info.world_size,))
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    # The returned logits are a view (the vocabulary padding sliced off); nothing modifies them in place.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")


def _latest_checkpoint(args, out_dir: Path):
    if not args.fsdp:
        return ckpt.latest_checkpoint(out_dir)
    return distributed.latest_sharded_checkpoint(out_dir)


def _check_out_dir(out_dir: Path) -> None:
    """Fail at start-up, in one line, if checkpoints and the log cannot be written to ``out_dir``,
    rather than with a traceback at the first checkpoint. A probe file is written (os.access would
    say yes to root on a read-only mount, and no to nothing that matters)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise RunError(f"--out-dir {out_dir} is a file, not a folder: give a folder for checkpoints and the log")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise RunError(f"--out-dir {out_dir} is not a writable folder ({e.strerror or e}): give a folder "
                       "this user can write checkpoints and the log to") from e


def _silent(*args, **kwargs):
    pass


def _sample(model, args, generator, device, dtype) -> str:
    idx = torch.tensor([encode(args.sample_prompt)], dtype=torch.long, device=device)
    with autocast(device, dtype):
        out = generate(model, idx, args.sample_tokens, temperature=1.0, top_k=50, generator=generator)
    return decode(out[0].tolist())


def _truncate_log(log_path: Path, start_step: int) -> None:
    """Drop records of steps the resumed run will redo, so the log reads as one uninterrupted run.

    A run killed mid-write (SIGKILL, power cut, full disk) can leave a torn last line: it is dropped
    with a warning. The shorter log replaces the old one atomically (temporary file, fsync, rename),
    so a kill during this rewrite leaves the old log or the new one, never a half-written one."""
    if not log_path.exists():
        return
    lines = log_path.read_text(errors="replace").splitlines()
    kept = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            step = int(record["step"])
        except (ValueError, KeyError, TypeError) as e:
            if number == len(lines):  # the last line: a write the crash cut short
                warnings.warn(f"{log_path}: dropping its torn last line ({line[:60]!r}...): the run died while "
                              "writing it", stacklevel=2)
                continue
            raise RunError(f"{log_path}: line {number} is not a log record ({type(e).__name__}: {e}); "
                           "move the log away to resume") from e
        if step < start_step:
            kept.append(line)
    for stale in log_path.parent.glob(f".{log_path.name}.tmp-*"):  # left by a run killed during this rewrite
        stale.unlink(missing_ok=True)
    tmp = log_path.with_name(f".{log_path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write("".join(line + "\n" for line in kept))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, log_path)
        ckpt.fsync_dir(log_path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def _print_header(args, config, model, device, dtype, grad_accum, total, data, dist_info) -> None:
    print(f"model: {args.preset}, {model.num_parameters():,} parameters ({config.n_layer} layers, "
          f"{config.n_head} heads, width {config.n_embd}, vocab {config.vocab_size} padded to {config.padded_vocab_size})")
    print(f"device: {device}, dtype {str(dtype).replace('torch.', '')}; data: {data}")
    print(f"batch: {args.batch_size} x {args.seq_len} tokens x {dist_info.world_size} ranks, {grad_accum} micro-steps, "
          f"{total:,} tokens per step")
    if device.type != "cuda" and not registry.TRITON_INTERPRETER:
        print("kernels: no CUDA GPU here, so every op runs its PyTorch reference "
              "(Triton kernels need a GPU; the tests run them in Triton's slow interpreter)")
    print(registry.report(device))


def _print_schedule(args, tokens_per_step: int, train_tokens: int) -> None:
    scheduled = args.max_steps * tokens_per_step
    passes = scheduled / train_tokens
    print(f"schedule: {args.max_steps:,} steps x {tokens_per_step:,} tokens = {scheduled:,} tokens, "
          f"{passes:,.1f} passes over the {train_tokens:,} training tokens")
    if passes > 2:
        print("schedule: the model will see each token many times and overfit; for a real run point --data "
              "at a larger corpus (python -m gpt.data prepare FILES --out DIR)")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, OSError) as e:  # a user's mistake or the machine's (a full disk): one line, no traceback
        # "path: Permission denied" rather than "[Errno 13] Permission denied: 'path'".
        message = f"{e.filename}: {e.strerror}" if isinstance(e, OSError) and e.filename and e.strerror else e
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
