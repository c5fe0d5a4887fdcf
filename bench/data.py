"""``python -m bench data``: how fast ``prepare`` tokenizes, against tiktoken alone, and its peak memory.

    python -m bench data                       # a 32 MB corpus for speed, a 1024 MB text file for memory
    python -m bench data --corpus-mb 4 --large-mb 16 --repeats 1

- **Raw baseline**: tiktoken's ``encode_ordinary_batch`` over the corpus's documents, already in
  memory, in one process on one thread: what build-nanogpt's ``fineweb.py`` does per process.
- **prepare, 1 and 2 workers**: the same documents as one parquet file (FineWeb's format), through
  ``prepare`` in a fresh process: reading, tokenizing, splitting and writing shards. Tokens/s per
  worker is the throughput divided by the workers; its ratio to the baseline is above 1 where a
  worker, reading and writing included, outruns tiktoken's own batch call.
- **Peak memory**: ``prepare`` with 2 workers on one generated plain-text file of ``--large-mb``
  (read in chunks): the peak resident memory of the main process and of the largest worker.

The documents are English prose: paragraphs of the Python reference manual (``pydoc_data``), shuffled
into documents of 3 to 30 paragraphs by a seeded generator. Each prepare run is timed inside its
process, best of ``--repeats``. Results go to ``--out``/``<UTC date>-<cpu>-data/``: ``data.json``
and ``data.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import environment, report

DATA_RESULTS_DIR = report.RESULTS_DIR / "data"
PARQUET_RUN = "prepare, parquet, {} worker(s)"
# Runs ``prepare`` in a fresh process: its time, its peak memory and that of its largest worker.
_CHILD = """
import json, resource, sys, time
from gpt.data import prepare
from gpt.data.tasks import peak_rss_mib
from gpt.tokenizer import get_encoding
args = json.loads(sys.argv[1])
get_encoding()  # built before the clock starts, as for the baseline (a second, once per run)
start = time.perf_counter()
manifest = prepare(args["input"], args["out"], workers=args["workers"], shard_tokens=args["shard_tokens"],
                   val_fraction=0.0, verbose=False)
seconds = time.perf_counter() - start
workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # the largest worker (forked here)
print(json.dumps({"seconds": seconds, "tokens": manifest["splits"]["train"]["tokens"],
                  "main_peak_rss_mib": peak_rss_mib(), "worker_peak_rss_mib": workers if args["workers"] > 1 else None}))
"""


def prose_documents(total_bytes: int, seed: int = 0):
    """Documents of English prose until ``total_bytes`` of text."""
    from pydoc_data.topics import topics

    paragraphs = [p for text in topics.values() for p in text.split("\n\n") if p.strip()]
    rng = random.Random(seed)
    size = 0
    while size < total_bytes:
        document = "\n\n".join(rng.choice(paragraphs) for _ in range(rng.randint(3, 30)))
        size += len(document.encode())
        yield document


def write_parquet(documents: list[str], path: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": documents}), path, row_group_size=1000)
    return path


def write_large_text(path: Path, megabytes: int) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for document in prose_documents(megabytes << 20, seed=1):
            f.write(document + "\n\n")
    return path


def measure_baseline(documents: list[str]) -> dict:
    from gpt.tokenizer import get_encoding

    encoding = get_encoding()
    start = time.perf_counter()
    tokens = sum(len(t) + 1 for t in encoding.encode_ordinary_batch(documents, num_threads=1))
    seconds = time.perf_counter() - start
    return {"name": "tiktoken encode_ordinary_batch (raw baseline, 1 thread)", "workers": 1, "tokens": tokens,
            "seconds": seconds, "tokens_per_s": tokens / seconds, "tokens_per_s_per_worker": tokens / seconds}


def measure_prepare(input_path: Path, workers: int, work_dir: Path, name: str) -> dict:
    """One ``prepare`` in a fresh process (so that its memory is its own)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(environment.REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    args = {"input": str(input_path), "out": str(work_dir / "out"), "workers": workers, "shard_tokens": 100_000_000}
    done = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(args)], capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(f"prepare with {workers} workers failed: {done.stderr.strip()[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    rate = result["tokens"] / result["seconds"]
    return {"name": name, "workers": workers, **result, "tokens_per_s": rate, "tokens_per_s_per_worker": rate / workers}


def best_of(runs: list[dict]) -> dict:
    """The fastest run, with the largest peak memory of them all."""
    best = dict(min(runs, key=lambda r: r["seconds"]))
    for key in ("main_peak_rss_mib", "worker_peak_rss_mib"):
        best[key] = max((r[key] or 0) for r in runs) or None
    return best


def run(args: argparse.Namespace) -> dict:
    import pyarrow
    import tiktoken

    results = {
        "kind": "data",
        "command": " ".join(["python", "-m", "bench", "data", *args.argv]),
        "environment": {**environment.describe("cpu", environment.utc_now()), "cpu_count": os.cpu_count(),
                        "tiktoken": tiktoken.__version__, "pyarrow": pyarrow.__version__},
        "corpus_mb": args.corpus_mb, "large_mb": args.large_mb, "repeats": args.repeats, "rows": [],
    }
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        tmp = Path(tmp)
        documents = list(prose_documents(int(args.corpus_mb * (1 << 20))))
        corpus = write_parquet(documents, tmp / "corpus.parquet")
        print(f"bench data: {len(documents):,} documents, {args.corpus_mb} MB of prose")
        # The runs interleave (baseline, 1 worker, 2 workers, again...), best of each kept, so that a
        # busy spell of a shared machine does not land on one configuration alone.
        runs: dict[str, list[dict]] = {}
        for _ in range(args.repeats):
            runs.setdefault("baseline", []).append(measure_baseline(documents))
            for workers in (1, 2):
                runs.setdefault(workers, []).append(measure_prepare(corpus, workers, tmp, PARQUET_RUN.format(workers)))
        del documents
        baseline = min(runs.pop("baseline"), key=lambda r: r["seconds"])
        rows = [baseline] + [best_of(r) for r in runs.values()]
        if args.large_mb:
            large = write_large_text(tmp / "large.txt", args.large_mb)
            rows.append(measure_prepare(large, 2, tmp, f"prepare, one {args.large_mb} MB text file, 2 workers"))
        for row in rows:
            row["per_worker_vs_baseline"] = row["tokens_per_s_per_worker"] / baseline["tokens_per_s"]
            row["vs_baseline"] = row["tokens_per_s"] / baseline["tokens_per_s"]
            print(f"  {row['name']:48s} {row['tokens_per_s']:>12,.0f} tokens/s  "
                  f"{row['per_worker_vs_baseline']:.2f}x baseline per worker"
                  + (f"  peak RSS main {row['main_peak_rss_mib']:,.0f} MiB" if "main_peak_rss_mib" in row else "")
                  + (f", worker {row['worker_peak_rss_mib']:,.0f} MiB" if row.get("worker_peak_rss_mib") else ""))
        results["rows"] = rows
    return results


def render_markdown(results: dict) -> str:
    env = results["environment"]
    lines = [f"# python -m bench data: {env['device_name']}, {env['cpu_count']} cores", "",
             f"`{results['command']}` at {env['date_utc']}, commit {env['git_commit'][:12]}"
             + (" (dirty)" if env.get("git_dirty") else ""), "",
             "| run | workers | tokens | s | tokens/s | tokens/s per worker | per worker vs baseline | vs baseline "
             "| peak RSS main MiB | peak RSS worker MiB |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results["rows"]:
        rss = [f"{r[k]:,.0f}" if r.get(k) else "" for k in ("main_peak_rss_mib", "worker_peak_rss_mib")]
        lines.append(f"| {r['name']} | {r['workers']} | {r['tokens']:,} | {r['seconds']:.2f} | {r['tokens_per_s']:,.0f} "
                     f"| {r['tokens_per_s_per_worker']:,.0f} | {r['per_worker_vs_baseline']:.2f}x "
                     f"| {r['vs_baseline']:.2f}x | {rss[0]} | {rss[1]} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus-mb", type=float, default=32, help="prose for the speed runs (default 32)")
    p.add_argument("--large-mb", type=int, default=1024, help="the text file of the memory run; 0 skips it")
    p.add_argument("--repeats", type=int, default=3, help="speed runs per configuration, best kept (default 3)")
    p.add_argument("--out", type=Path, default=DATA_RESULTS_DIR, help=f"folder of runs (default {DATA_RESULTS_DIR})")
    args = p.parse_args(argv)
    if args.corpus_mb <= 0 or args.large_mb < 0 or args.repeats < 1:
        raise ValueError("--corpus-mb must be positive, --large-mb at least 0 and --repeats at least 1")
    args.argv = argv
    results = run(args)
    run_dir = report.create_run_dir(results, args.out, suffix="data")
    (run_dir / "data.json").write_text(json.dumps(report.jsonable(results), indent=2) + "\n")
    (run_dir / "data.md").write_text(render_markdown(results))
    print(f"bench data: results in {run_dir}")
    return 0
