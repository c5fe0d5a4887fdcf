"""The command line: ``python -m gpt.data prepare | info | verify`` (see ``gpt.data``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import gpt.data
from gpt.data.corpus import DEFAULT_CORPUS_NAME, default_corpus_dir, prepare_default_corpus
from gpt.data.pipeline import DEFAULT_SHARD_TOKENS, DEFAULT_VAL_FRACTION, prepare
from gpt.data.shards import MANIFEST, SPLITS, DataError, find_shards, read_shard
from gpt.data.verification import print_verify_report, verify
from gpt.tokenizer import VOCAB_SIZE


def _info(data: str) -> None:
    manifest = Path(data) / MANIFEST
    if manifest.is_file():
        print(f"{manifest}: source {json.loads(manifest.read_text()).get('source')}")
    elif Path(data).is_dir():
        print(f"{data}: no {MANIFEST} (not prepared by gpt.data, or its preparation did not finish)")
    found = False
    for split in SPLITS:
        try:
            shards = find_shards(data, split)
        except DataError:
            continue
        found = True
        counts = [read_shard(p).size for p in shards]
        for path, count in zip(shards, counts):
            print(f"  {path.name}: {count:,} tokens")
        print(f"{split}: {len(shards)} shards, {sum(counts):,} tokens")
    if not found:
        raise DataError(f"no shards in {data} (looked for *train*/*val* files ending in .bin or .npy)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gpt.data", description=gpt.data.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("prepare", help="tokenize text, jsonl, parquet or Arrow corpora into shards")
    p.add_argument("inputs", nargs="*", help="files, folders or globs (none: the default corpus)")
    p.add_argument("--out", help="output folder (required with inputs; default corpus: its cache folder)")
    p.add_argument("--name", help="shard file prefix (default: 'data', or 'stdlib' for the default corpus)")
    p.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, help="tokens per shard")
    p.add_argument("--val-fraction", type=float, default=DEFAULT_VAL_FRACTION, help="share of documents for val")
    p.add_argument("--workers", type=int, help="tokenizing processes (default: every core)")
    p.add_argument("--text-field", default="text", help="the field (jsonl) or column (parquet, Arrow) holding "
                                                        "the text (default: text)")
    p.add_argument("--limit-tokens", type=int, help="stop after this many tokens (train and val together)")
    p.add_argument("--skip-bad-records", action="store_true",
                   help="count and skip records that cannot be read (and the unreadable rest of a damaged file) "
                        "instead of stopping")
    i = commands.add_parser("info", help="list a folder's shards and token counts")
    i.add_argument("data", help="folder (or glob) of shards")
    v = commands.add_parser("verify", help="check every shard's header, token count and ids; exit 2 on corruption")
    v.add_argument("data", help="folder (or glob) of shards")
    v.add_argument("--vocab-size", type=int, default=VOCAB_SIZE, help="token ids must be below this")
    args = parser.parse_args(argv)

    try:
        if args.command == "info":
            _info(args.data)
        elif args.command == "verify":
            report = verify(args.data, args.vocab_size)
            print_verify_report(report)
            if not report.ok:
                raise DataError(f"{args.data}: {len(report.problems)} problem(s): {'; '.join(report.problems)}")
            print("OK")
        elif args.inputs:
            if not args.out:
                raise DataError("prepare: --out DIR is required when inputs are given")
            prepare(args.inputs, args.out, shard_tokens=args.shard_tokens, val_fraction=args.val_fraction,
                    workers=args.workers, name=args.name or "data", text_field=args.text_field,
                    limit_tokens=args.limit_tokens, skip_bad_records=args.skip_bad_records)
        else:
            prepare_default_corpus(Path(args.out) if args.out else default_corpus_dir(),
                                   name=args.name or DEFAULT_CORPUS_NAME, shard_tokens=args.shard_tokens,
                                   val_fraction=args.val_fraction, workers=args.workers)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
