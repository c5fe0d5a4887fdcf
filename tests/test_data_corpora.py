"""Preparing corpora: jsonl (plain, .gz, .zst), parquet, Arrow files and ``datasets`` folders, large plain
text in chunks, bad input, --limit-tokens, worker-count determinism and kill-and-restart."""

import gzip
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from gpt.data import DataError, find_shards, main, prepare, read_shard, verify
from gpt.data import pipeline, sources
from gpt.data.tasks import split_key
from gpt.tokenizer import EOT_TOKEN, get_encoding

ROOT = Path(__file__).resolve().parents[1]

# Documents with multi-byte characters, whitespace runs, special-token text and an empty one.
DOCS = [f"Document {i}: héllo wörld 日本語 🙂 <|endoftext|> " + "word  " * (i % 23) + "\n\n  end" * (i % 3)
        for i in range(60)] + [""]


def tokens_of(texts) -> list[int]:
    """build-nanogpt's layout: EOT, then the document's tokens, for each non-empty document."""
    out = []
    for text in texts:
        if text:
            out += [EOT_TOKEN, *get_encoding().encode_ordinary(text)]
    return out


def split_stream(out: Path, split: str) -> list[int]:
    try:
        return np.concatenate([read_shard(p) for p in find_shards(out, split)]).tolist()
    except DataError:
        return []


def expected_splits(name: str, texts, val_fraction: float, where="line", first=1):
    """The tokens each split should hold: a record goes to val when its name's hash is below the fraction."""
    val = [split_key(f"{name} {where} {i}") < val_fraction for i in range(first, first + len(texts))]
    return (tokens_of(t for t, v in zip(texts, val) if not v), tokens_of(t for t, v in zip(texts, val) if v))


def write_jsonl(path: Path, records) -> Path:
    data = "".join(json.dumps(r) + "\n" for r in records).encode()
    if path.suffix == ".gz":
        data = gzip.compress(data)
    elif path.suffix == ".zst":
        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)
    return path


def write_arrow_stream(path: Path, table: pa.Table, batch_rows: int = 7) -> Path:
    """An Arrow IPC stream file, as Hugging Face datasets writes them."""
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        for batch in table.to_batches(max_chunksize=batch_rows):
            writer.write_batch(batch)
    return path


def write_datasets_folder(folder: Path, texts, parts: int = 2) -> Path:
    """A folder as ``datasets``' save_to_disk leaves it: Arrow stream files listed in state.json."""
    folder.mkdir(parents=True)
    table = pa.table({"id": list(range(len(texts))), "text": texts})
    step = -(-len(texts) // parts)
    files = []
    for k in range(parts):
        name = f"data-{k:05d}-of-{parts:05d}.arrow"
        write_arrow_stream(folder / name, table.slice(k * step, step))
        files.append({"filename": name})
    (folder / "state.json").write_text(json.dumps({"_data_files": files, "_split": "train"}))
    (folder / "dataset_info.json").write_text(json.dumps({"features": {"text": {"dtype": "string"}}}))
    return folder


@pytest.fixture(autouse=True)
def small_tasks(monkeypatch):
    """Tasks of a few hundred bytes, so that these small inputs are cut into many."""
    monkeypatch.setattr(sources, "TASK_BYTES", 300)


# ----------------------------------------------------------------------------------------------------
# Every format: the tokens are tiktoken's, the manifest's counts are the shards'


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".jsonl.zst", ".json"])
def test_jsonl_formats(tmp_path, suffix):
    path = write_jsonl(tmp_path / f"corpus{suffix}", [{"id": i, "text": t} for i, t in enumerate(DOCS)])
    manifest = prepare(path, tmp_path / "out", shard_tokens=97, val_fraction=0.2, workers=1, verbose=False)
    train, val = expected_splits(path.name, DOCS, 0.2)
    assert split_stream(tmp_path / "out", "train") == train and split_stream(tmp_path / "out", "val") == val
    assert val and train
    assert manifest["records"] == len(DOCS) and manifest["empty_records"] == 1
    for split, tokens in (("train", train), ("val", val)):
        assert manifest["splits"][split]["tokens"] == len(tokens)
        assert manifest["splits"][split]["documents"] == tokens.count(EOT_TOKEN)


def test_lone_surrogates_are_tokenized_as_encode_ordinary_does(tmp_path):
    # JSON's "\ud800" escape gives a string no UTF-8 can hold: tiktoken's encode_ordinary replaces it.
    texts = ["before \ud800 after", "pair \ud83d\ude42 and lone \udfff"]
    path = write_jsonl(tmp_path / "surrogates.jsonl", [{"text": t} for t in texts])
    prepare(path, tmp_path / "out", val_fraction=0.0, workers=1, verbose=False)
    assert split_stream(tmp_path / "out", "train") == tokens_of(texts)


def test_parquet(tmp_path):
    path = tmp_path / "fineweb.parquet"
    pq.write_table(pa.table({"text": DOCS, "score": [0.5] * len(DOCS)}), path, row_group_size=9)
    manifest = prepare(path, tmp_path / "out", shard_tokens=200, val_fraction=0.2, workers=1, verbose=False)
    train, val = expected_splits(path.name, DOCS, 0.2, where="row", first=0)
    assert split_stream(tmp_path / "out", "train") == train and split_stream(tmp_path / "out", "val") == val
    assert manifest["splits"]["train"]["tokens"] + manifest["splits"]["val"]["tokens"] == len(train) + len(val)


def test_arrow_file_and_datasets_folders(tmp_path):
    write_arrow_stream(tmp_path / "single.arrow", pa.table({"text": DOCS}))
    with pa.OSFile(str(tmp_path / "ipcfile.arrow"), "wb") as sink, pa.ipc.new_file(sink, pa.schema([("text", pa.string())])) as w:
        w.write_table(pa.table({"text": DOCS}), max_chunksize=5)  # the IPC file format is read too
    for name in ("single.arrow", "ipcfile.arrow"):
        prepare(tmp_path / name, tmp_path / f"out-{name}", val_fraction=0, workers=1, verbose=False)
        assert split_stream(tmp_path / f"out-{name}", "train") == tokens_of(DOCS)

    # A DatasetDict: dataset_dict.json and one folder per split, each a dataset.
    write_datasets_folder(tmp_path / "dict" / "train", DOCS[:40], parts=3)
    write_datasets_folder(tmp_path / "dict" / "test", DOCS[40:], parts=1)
    (tmp_path / "dict" / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    manifest = prepare(tmp_path / "dict", tmp_path / "out", shard_tokens=150, val_fraction=0.3, workers=1, verbose=False)
    expected_train, expected_val = [], []
    for folder, texts, parts in (("test", DOCS[40:], 1), ("train", DOCS[:40], 3)):  # sorted by name
        step = -(-len(texts) // parts)
        for k in range(parts):
            part = texts[k * step:(k + 1) * step]
            train, val = expected_splits(f"{folder}/data-{k:05d}-of-{parts:05d}.arrow", part, 0.3, "row", 0)
            expected_train += train
            expected_val += val
    assert split_stream(tmp_path / "out", "train") == expected_train
    assert split_stream(tmp_path / "out", "val") == expected_val
    assert manifest["records"] == len(DOCS)


def test_text_field_and_mixed_inputs(tmp_path):
    (tmp_path / "in").mkdir()
    write_jsonl(tmp_path / "in" / "a.jsonl", [{"content": t} for t in DOCS[:10]])
    (tmp_path / "in" / "b.txt").write_text("a plain text document")
    with pytest.raises(DataError, match=r"a\.jsonl line 1: no 'text' field \(its fields: 'content'; choose one with --text-field\)"):
        prepare(tmp_path / "in", tmp_path / "out", workers=1, verbose=False)
    prepare(tmp_path / "in", tmp_path / "out", text_field="content", val_fraction=0, workers=1, verbose=False)
    assert split_stream(tmp_path / "out", "train") == tokens_of(DOCS[:10] + ["a plain text document"])


# ----------------------------------------------------------------------------------------------------
# A large plain-text file, read in chunks: the tokens of the whole file


TRICKY = ["a", "Z", "7", "'s", "'", ".", ",", "é", "日本", "🙂", "\u00a0", "\u3000", "\u2028", "\u0085", " ", "  ",
          "\n", "\n\n", "\r\n", "\t", " \n", "\n ", "word", " word", "123", "!?", "\ufffd"]


def test_chunk_cuts_keep_the_tokens_of_the_whole_text(tmp_path, monkeypatch):
    rng = random.Random(0)
    encode = get_encoding().encode_ordinary
    for trial in range(40):
        text = "".join(rng.choice(TRICKY) for _ in range(rng.randrange(50, 600)))
        if trial % 4 == 0:
            text += "x" * 900 + " y"  # a long line with no cut for a while
        path = tmp_path / f"t{trial}.txt"
        path.write_bytes(text.encode())
        monkeypatch.setattr(sources, "TASK_BYTES", rng.randrange(5, 60))
        size = path.stat().st_size
        cuts = [0, *sources.text_cuts(path, size)]
        assert cuts[-1] == size and len(cuts) > 2
        data = path.read_bytes()
        pieces = [data[a:b].decode() for a, b in zip(cuts, cuts[1:])]  # a cut never splits a character
        assert [t for p in pieces for t in encode(p)] == encode(text), (trial, cuts)


def test_large_text_file_in_chunks(tmp_path):
    line = "Ünïcödé 日本語 text 🙂, with punctuation!  And  double  spaces.\n"
    text = (line * 40) + "no newline for a long while " * 40 + "\u00a0\n\n" + line * 10
    (tmp_path / "big").mkdir()
    (tmp_path / "big" / "book.txt").write_text(text)
    (tmp_path / "big" / "small.txt").write_text("small")
    prepare(tmp_path / "big", tmp_path / "out", val_fraction=0, workers=2, verbose=False)
    assert split_stream(tmp_path / "out", "train") == tokens_of([text, "small"])


# ----------------------------------------------------------------------------------------------------
# Determinism, --limit-tokens, kill-and-restart


def make_mixed_corpus(folder: Path) -> Path:
    folder.mkdir()
    write_jsonl(folder / "a.jsonl.gz", [{"text": t} for t in DOCS])
    pq.write_table(pa.table({"text": DOCS[::-1]}), folder / "b.parquet", row_group_size=6)
    write_datasets_folder(folder / "c_dataset", DOCS[10:50])
    (folder / "d.txt").write_text("Some plain text.  " * 300)
    (folder / "e.md").write_text("# notes\n")
    return folder


def test_same_shards_for_any_worker_count(tmp_path):
    corpus = make_mixed_corpus(tmp_path / "corpus")
    for workers in (1, 2, 3):
        prepare(corpus, tmp_path / f"w{workers}", shard_tokens=300, val_fraction=0.2, workers=workers, verbose=False)
    names = sorted(os.listdir(tmp_path / "w1"))
    assert any("val" in n for n in names) and sum("train" in n for n in names) > 3
    for workers in (2, 3):
        assert sorted(os.listdir(tmp_path / f"w{workers}")) == names
        for name in names:
            assert (tmp_path / "w1" / name).read_bytes() == (tmp_path / f"w{workers}" / name).read_bytes(), name


def test_limit_tokens(tmp_path):
    corpus = make_mixed_corpus(tmp_path / "corpus")
    prepare(corpus, tmp_path / "all", shard_tokens=250, val_fraction=0, workers=1, verbose=False)
    everything = split_stream(tmp_path / "all", "train")
    assert main(["prepare", str(corpus), "--out", str(tmp_path / "cut"), "--shard-tokens", "250",
                 "--val-fraction", "0", "--limit-tokens", "1234", "--workers", "2"]) == 0
    assert split_stream(tmp_path / "cut", "train") == everything[:1234]
    manifest = json.loads((tmp_path / "cut" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["tokens"] == 1234 and manifest["limit_tokens"] == 1234


def test_an_interrupted_run_continues_where_it_stopped(tmp_path, monkeypatch):
    """Failing at each shard's publication (before the rename, and just after it, before the progress
    record), then running again, gives the uninterrupted run's bytes."""
    corpus = make_mixed_corpus(tmp_path / "corpus")
    settings = dict(shard_tokens=150, val_fraction=0.2, workers=1, verbose=False)
    prepare(corpus, tmp_path / "reference", **settings)
    publish = pipeline._publish
    for fail_after_rename in (False, True):
        out = tmp_path / f"out-{fail_after_rename}"
        count = {"calls": 0}

        def failing(partial, final, after=fail_after_rename):
            count["calls"] += 1
            if count["calls"] in (2, 5, 9, 14, 20, 27, 35):
                if after:
                    publish(partial, final)
                raise OSError("killed")
            publish(partial, final)

        monkeypatch.setattr(pipeline, "_publish", failing)
        failures = 0
        while True:
            try:
                prepare(corpus, out, **settings)
                break
            except OSError:
                failures += 1
                assert not (out / "manifest.json").exists()
                assert any("an unfinished prepare" in note for note in verify(out).notes)
        assert failures == 7
        monkeypatch.setattr(pipeline, "_publish", publish)
        assert sorted(os.listdir(out)) == sorted(os.listdir(tmp_path / "reference"))
        for name in os.listdir(out):
            assert (out / name).read_bytes() == (tmp_path / "reference" / name).read_bytes(), name


def test_kill_and_restart(tmp_path):
    """SIGKILL a real prepare at random moments; run it again each time; the result is the
    uninterrupted run's, byte for byte."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rng = random.Random(1)
    words = ["alpha", "beta", "gamma", "délta", "日本", "🙂", "the", "of", "and", "42", "\n"]
    write_jsonl(corpus / "big.jsonl.zst",
                [{"text": " ".join(rng.choice(words) for _ in range(rng.randrange(20, 300)))} for _ in range(1500)])
    command = [sys.executable, "-m", "gpt.data", "prepare", str(corpus), "--shard-tokens", "8000",
               "--val-fraction", "0.1", "--workers", "2"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    reference = subprocess.run(command + ["--out", str(tmp_path / "reference")], env=env, capture_output=True, text=True)
    assert reference.returncode == 0, reference.stderr

    out = tmp_path / "out"
    kills = 0
    for shards_before_kill in (1, 6, 14, 22):
        process = subprocess.Popen(command + ["--out", str(out)], env=env, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, start_new_session=True)
        while process.poll() is None and len(list(out.glob("data_*.bin"))) < shards_before_kill:
            time.sleep(0.002)
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)  # the workers too
            kills += 1
        process.wait()
    assert kills >= 1
    finished = subprocess.run(command + ["--out", str(out)], env=env, capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr
    names = sorted(os.listdir(tmp_path / "reference"))
    assert sorted(os.listdir(out)) == names and len(names) > 4
    for name in names:
        assert (out / name).read_bytes() == (tmp_path / "reference" / name).read_bytes(), name


# ----------------------------------------------------------------------------------------------------
# Bad input: one error naming the file and the record, or counted with --skip-bad-records


NUMBERED_LINES = "".join(json.dumps({"text": f"record {i} of {i * 7919 % 10007}"}) + "\n" for i in range(8000)).encode()


def _truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


BAD_INPUTS = {
    "missing field": ("x.jsonl", lambda p: write_jsonl(p, [{"text": "ok"}, {"txt": "no"}]),
                      r"x\.jsonl line 2: no 'text' field"),
    "number": ("x.jsonl", lambda p: write_jsonl(p, [{"text": "ok"}, {"text": "ok"}, {"text": 5}]),
               r"x\.jsonl line 3: the 'text' field is int, expected a string"),
    "null": ("x.jsonl", lambda p: write_jsonl(p, [{"text": None}]), r"x\.jsonl line 1: the 'text' field is null"),
    "not an object": ("x.jsonl", lambda p: p.write_text('{"text": "ok"}\n["a"]\n'),
                      r"x\.jsonl line 2: expected a JSON object, got list"),
    "invalid json": ("x.jsonl", lambda p: p.write_text('{"text": "ok"}\n\n{"text": "cut\n'),
                     r"x\.jsonl line 3: not valid JSON"),
    "corrupt gzip": ("x.jsonl.gz", lambda p: p.write_bytes(_truncated(gzip.compress(NUMBERED_LINES))),
                     r"x\.jsonl\.gz after line \d+: corrupt gzip data"),
    "not gzip": ("x.jsonl.gz", lambda p: p.write_bytes(b"plain bytes, not gzip" * 10), r"x\.jsonl\.gz: corrupt gzip data"),
    "truncated zstd": ("x.jsonl.zst", lambda p: p.write_bytes(_truncated(zstandard.ZstdCompressor().compress(
        NUMBERED_LINES))), r"x\.jsonl\.zst( after line \d+)?: corrupt zstd data .*ends inside a zstd frame"),
    "not zstd": ("x.jsonl.zst", lambda p: p.write_bytes(b"garbage!" * 10), r"x\.jsonl\.zst: corrupt zstd data"),
    "corrupt parquet": ("x.parquet", lambda p: p.write_bytes(b"PAR1" + b"\x00" * 100),
                        r"x\.parquet: not a readable parquet file"),
    "truncated parquet": ("x.parquet", lambda p: (pq.write_table(pa.table({"text": ["a"] * 100}), p),
                                                  p.write_bytes(_truncated(p.read_bytes()))),
                          r"x\.parquet: not a readable parquet file"),
    "parquet text column of ints": ("x.parquet", lambda p: pq.write_table(pa.table({"text": [1, 2]}), p),
                                    r"x\.parquet: the 'text' column holds int64, expected strings"),
    "parquet null": ("x.parquet", lambda p: pq.write_table(pa.table({"text": ["a", None]}), p),
                     r"x\.parquet row 1: the 'text' field is null"),
    "empty jsonl": ("x.jsonl", lambda p: p.write_text("\n \n"), r"x\.jsonl: empty input: no records"),
    "empty gzip": ("x.jsonl.gz", lambda p: p.write_bytes(gzip.compress(b"")), r"x\.jsonl\.gz: empty input"),
    "empty parquet": ("x.parquet", lambda p: pq.write_table(pa.table({"text": pa.array([], pa.string())}), p),
                      r"x\.parquet: empty input: no rows"),
    "empty arrow": ("x.arrow", lambda p: write_arrow_stream(p, pa.table({"text": pa.array([], pa.string())})),
                    r"x\.arrow: empty input: no rows"),
    "not arrow": ("x.arrow", lambda p: p.write_bytes(b"nope" * 10), r"x\.arrow: not a readable Arrow file"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_names_the_file_and_record(tmp_path, case):
    name, make, message = BAD_INPUTS[case]
    (tmp_path / "in").mkdir()
    make(tmp_path / "in" / name)
    write_jsonl(tmp_path / "in" / "good.jsonl", [{"text": "a good document"}])
    with pytest.raises(DataError, match=message):
        prepare(tmp_path / "in", tmp_path / "out", workers=1, verbose=False)
    assert not (tmp_path / "out" / "manifest.json").exists()
    # --skip-bad-records counts them, keeps the good documents and says which were skipped.
    manifest = prepare(tmp_path / "in", tmp_path / "out", workers=1, skip_bad_records=True, val_fraction=0,
                       verbose=False)
    assert manifest["bad_records"] >= 1 and any(re.search(message, m) for m in manifest["bad_record_examples"])
    assert "a good document" in get_encoding().decode(split_stream(tmp_path / "out", "train"))


def test_bad_input_on_the_command_line(tmp_path):
    write_jsonl(tmp_path / "x.jsonl", [{"text": "ok"}, {"text": ["no"]}])
    result = subprocess.run([sys.executable, "-m", "gpt.data", "prepare", str(tmp_path / "x.jsonl"), "--out",
                             str(tmp_path / "out"), "--workers", "2"], capture_output=True, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert errors == result.stderr.strip().splitlines()[-1:] == [
        "error: x.jsonl line 2: the 'text' field is list, expected a string (--skip-bad-records skips such records)"]
    skipped = subprocess.run([sys.executable, "-m", "gpt.data", "prepare", str(tmp_path / "x.jsonl"), "--out",
                              str(tmp_path / "out"), "--skip-bad-records"], capture_output=True, text=True, cwd=ROOT,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert skipped.returncode == 0 and "skipped 1 bad records or inputs; the first: x.jsonl line 2" in skipped.stdout


# ----------------------------------------------------------------------------------------------------
# python -m bench data, on a tiny input (the measured figures come from the full run)


def test_bench_data_writes_json_and_markdown(tmp_path):
    from bench import data as bench_data

    assert bench_data.main(["--corpus-mb", "0.05", "--large-mb", "1", "--repeats", "1", "--out", str(tmp_path)]) == 0
    [run_dir] = list(tmp_path.iterdir())
    results = json.loads((run_dir / "data.json").read_text())
    rows = {row["name"]: row for row in results["rows"]}
    baseline = rows["tiktoken encode_ordinary_batch (raw baseline, 1 thread)"]
    for workers in (1, 2):
        row = rows[bench_data.PARQUET_RUN.format(workers)]
        assert row["tokens"] == baseline["tokens"]  # prepare tokenized exactly the baseline's documents
        assert row["tokens_per_s"] > 0 and row["main_peak_rss_mib"] > 0
    assert rows["prepare, one 1 MB text file, 2 workers"]["worker_peak_rss_mib"] > 0
    markdown = (run_dir / "data.md").read_text()
    assert "| prepare, parquet, 2 worker(s) | 2 |" in markdown and "per worker vs baseline" in markdown
