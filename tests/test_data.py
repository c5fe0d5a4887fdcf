"""Shards, preparation and the loader: formats and their corruptions, splits, determinism, resuming."""

import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from gpt.data import corpus as corpus_module
from gpt.data import pipeline as pipeline_module
from gpt.data import (
    DataError,
    DataLoader,
    default_corpus_dir,
    default_corpus_files,
    ensure_default_corpus,
    find_shards,
    main,
    prepare,
    read_shard,
    write_shard,
)
from gpt.tokenizer import EOT_TOKEN, decode

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------------
# Shard formats


def test_llmc_shard_round_trip(tmp_path):
    tokens = np.array([0, 1, 50256, 65535, 7], dtype=np.int64)
    path = write_shard(tmp_path / "x_train_000000.bin", tokens)
    header = np.fromfile(path, dtype="<i4", count=256)
    assert list(header[:3]) == [20240520, 1, 5] and not header[3:].any()
    assert path.stat().st_size == 256 * 4 + 5 * 2
    read = read_shard(path)
    assert read.dtype == np.uint16 and read.tolist() == tokens.tolist()
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind


def test_nanogpt_raw_bin(tmp_path):
    tokens = np.arange(1000, dtype=np.uint16)
    tokens.tofile(tmp_path / "train.bin")
    assert read_shard(tmp_path / "train.bin").tolist() == tokens.tolist()


@pytest.mark.parametrize("dtype", [np.uint16, np.int32, np.int64])
def test_npy_shards(tmp_path, dtype):
    tokens = np.array([3, 0, 50256, 65535], dtype=dtype)
    np.save(tmp_path / "shard_train_000000.npy", tokens)
    read = read_shard(tmp_path / "shard_train_000000.npy")
    assert read.dtype == np.uint16 and read.tolist() == tokens.tolist()


@pytest.mark.parametrize("bad", [65536, -1])
def test_npy_ids_outside_uint16_are_refused(tmp_path, bad):
    np.save(tmp_path / "s.npy", np.array([1, bad, 2], dtype=np.int64))
    with pytest.raises(DataError, match=r"s\.npy: token ids must lie in \[0, 65536\)"):
        read_shard(tmp_path / "s.npy")


def test_write_shard_refuses_ids_outside_uint16(tmp_path):
    with pytest.raises(DataError, match="65536"):
        write_shard(tmp_path / "s.bin", [1, 70000])
    assert list(tmp_path.iterdir()) == []


def _llmc_bytes(version=1, count=4, tokens=4):
    header = np.zeros(256, dtype="<i4")
    header[:3] = 20240520, version, count
    return header.tobytes() + np.arange(tokens, dtype="<u2").tobytes()


@pytest.mark.parametrize(
    "content, message",
    [
        (_llmc_bytes(version=2), "corrupt shard header: version 2, expected 1"),
        (_llmc_bytes(count=10), "truncated shard: the header announces 10 tokens"),
        (_llmc_bytes(count=2), "corrupt shard header: it announces 2 tokens"),
        (_llmc_bytes()[:500], "truncated shard: 500 bytes, shorter than llm.c's 1024-byte header"),
        (_llmc_bytes(count=0, tokens=0), "empty shard"),
        (b"", "empty shard"),
        (b"\x01\x00\x02", "truncated shard: 3 bytes is not a whole number of uint16 tokens"),
    ],
)
def test_corrupt_bin_is_refused(tmp_path, content, message):
    path = tmp_path / "bad_train.bin"
    path.write_bytes(content)
    with pytest.raises(DataError, match=str(path).replace(".", r"\.") + ": " + message):
        read_shard(path)


def test_unreadable_npy_and_unknown_extension(tmp_path):
    (tmp_path / "a.npy").write_bytes(b"not numpy")
    with pytest.raises(DataError, match=r"a\.npy: not a readable \.npy file"):
        read_shard(tmp_path / "a.npy")
    (tmp_path / "a.txt").write_text("hello")
    with pytest.raises(DataError, match="unknown shard format"):
        read_shard(tmp_path / "a.txt")


def test_find_shards(tmp_path):
    for name in ["d_train_000001.bin", "d_train_000000.bin", "d_val_000000.npy", ".d_train_000002.bin.1-ab.tmp",
                 "manifest.json", "notes_train.txt"]:
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in find_shards(tmp_path, "train")] == ["d_train_000000.bin", "d_train_000001.bin"]
    assert [p.name for p in find_shards(tmp_path, "val")] == ["d_val_000000.npy"]
    assert [p.name for p in find_shards(tmp_path / "*_000000.*", "train")] == ["d_train_000000.bin"]
    (tmp_path / "x").mkdir()
    with pytest.raises(DataError, match=re.escape(f"no train shards in {tmp_path / 'x'} (looked for *train*.bin")):
        find_shards(tmp_path / "x", "train")
    with pytest.raises(DataError, match="neither a folder nor a glob"):
        find_shards(tmp_path / "missing", "val")
    with pytest.raises(DataError, match="unknown split 'test'"):
        find_shards(tmp_path, "test")


# ----------------------------------------------------------------------------------------------------
# Preparing shards from text

DOCUMENTS = {
    "a.txt": "The quick brown fox jumps over the lazy dog.\n",
    "b.md": "# Title\n\nSome *markdown* text, with unicode: café, 日本語, 🙂.\n",
    "code/main.py": "def main():\n    print('hello <|endoftext|> world')\n",
    "code/util/helpers.py": "import os\n\nPATH = os.sep.join(['a', 'b'])\n" * 20,
    "notes/one.txt": "one " * 100,
    "notes/two.txt": "two\n" * 50,
    "notes/three.txt": "Three is the number after two.",
    "notes/four.txt": "Four.",
    "poem.txt": "Roses are red,\nviolets are blue.\n",
    "tabs.tsv": "x\ty\tz\n1\t2\t3\n",
}


def make_corpus(folder: Path) -> Path:
    for name, text in DOCUMENTS.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text, encoding="utf-8")
    (folder / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")  # binary: skipped
    (folder / "empty.txt").write_text("")  # nothing to learn: skipped
    (folder / ".git").mkdir()
    (folder / ".git" / "HEAD").write_text("ref: refs/heads/main\n")  # hidden: never listed
    return folder


@pytest.fixture
def corpus(tmp_path):
    return make_corpus(tmp_path / "corpus")


def read_split(out_dir: Path, split: str) -> list[str]:
    """The documents of a split, recovered from its shards."""
    stream = np.concatenate([read_shard(p) for p in find_shards(out_dir, split)]).tolist()
    documents, current = [], None
    for token in stream:
        if token == EOT_TOKEN:
            if current is not None:
                documents.append(decode(current))
            current = []
        else:
            current.append(token)
    documents.append(decode(current))
    assert stream[0] == EOT_TOKEN
    return documents


def test_prepare_round_trip(corpus, tmp_path):
    out = tmp_path / "out"
    manifest = prepare(corpus, out, shard_tokens=64, val_fraction=0.25, workers=1, name="toy", verbose=False)
    train, val = read_split(out, "train"), read_split(out, "val")
    assert sorted(train + val) == sorted(DOCUMENTS.values())
    assert len(val) >= 1 and len(train) >= 1
    assert len(find_shards(out, "train")) > 1  # 64-token shards: the stream was cut across several
    assert all(len(read_shard(p)) == 64 for p in find_shards(out, "train")[:-1])
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert manifest["tokenizer"] == "gpt2" and manifest["skipped_files"] == 2
    assert manifest["splits"]["val"]["documents"] == len(val)
    for split in ("train", "val"):
        shards = manifest["splits"][split]["shards"]
        assert shards == [p.name for p in find_shards(out, split)]
        assert shards[0] == f"toy_{split}_000000.bin"
        assert manifest["splits"][split]["tokens"] == sum(len(read_shard(out / s)) for s in shards)


def test_prepare_is_deterministic_for_any_worker_count(corpus, tmp_path):
    prepare(corpus, tmp_path / "one", shard_tokens=100, val_fraction=0.3, workers=1, verbose=False)
    prepare(corpus, tmp_path / "two", shard_tokens=100, val_fraction=0.3, workers=2, verbose=False)
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "two").iterdir())
    for name in names:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name


def test_split_follows_the_document_name_not_the_folder(corpus, tmp_path):
    moved = tmp_path / "elsewhere"
    corpus.rename(moved)
    prepare(moved, tmp_path / "a", val_fraction=0.3, workers=1, verbose=False)
    make_corpus(tmp_path / "copy")
    prepare(tmp_path / "copy", tmp_path / "b", val_fraction=0.3, workers=1, verbose=False)
    assert sorted(read_split(tmp_path / "a", "val")) == sorted(read_split(tmp_path / "b", "val"))


def test_manifest_is_written_last_and_stale_shards_go(corpus, tmp_path, monkeypatch):
    out = tmp_path / "out"
    prepare(corpus, out, shard_tokens=32, workers=1, verbose=False)
    many = len(find_shards(out, "train"))

    written = []

    publish = pipeline_module._publish

    def checking_publish(partial, final):
        assert not (out / "manifest.json").exists()  # an earlier run's manifest is gone before any shard
        written.append(final)
        if len(written) == 2:
            raise OSError("disk full")
        return publish(partial, final)

    monkeypatch.setattr(pipeline_module, "_publish", checking_publish)
    with pytest.raises(OSError, match="disk full"):
        prepare(corpus, out, shard_tokens=32, workers=1, verbose=False)
    assert not (out / "manifest.json").exists()  # the interrupted folder is known to be incomplete

    monkeypatch.undo()
    prepare(corpus, out, shard_tokens=10_000, workers=1, verbose=False)
    assert many > 1 and len(find_shards(out, "train")) == 1  # the earlier run's extra shards are gone
    assert (out / "manifest.json").exists()


def test_prepare_inputs_files_globs_and_bad_utf8(tmp_path):
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "b.txt").write_text("beta")
    (tmp_path / "c.log").write_bytes(b"caf\xe9 latin-1")  # not UTF-8: decoded with replacement characters
    out = tmp_path / "out"
    prepare([tmp_path / "a.txt", str(tmp_path / "*.log"), tmp_path / "b.txt"], out, workers=1, verbose=False)
    assert sorted(read_split(out, "train") + read_split(out, "val")) == ["alpha", "beta", "caf\ufffd latin-1"]


def test_prepare_errors(tmp_path):
    with pytest.raises(DataError, match="input .*nothing-here: no such file or folder"):
        prepare(tmp_path / "nothing-here", tmp_path / "out", verbose=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no input files in .*empty"):
        prepare(tmp_path / "empty", tmp_path / "out", verbose=False)
    (tmp_path / "binary").mkdir()
    (tmp_path / "binary" / "x.bin").write_bytes(b"\x00\x01")
    with pytest.raises(DataError, match="no text documents .*all 1 files are empty, binary or unreadable"):
        prepare(tmp_path / "binary", tmp_path / "out", verbose=False)
    with pytest.raises(DataError, match="val_fraction"):
        prepare(tmp_path / "binary", tmp_path / "out", val_fraction=1.0, verbose=False)


# ----------------------------------------------------------------------------------------------------
# The default corpus


def test_default_corpus_files():
    files = default_corpus_files()
    names = {f.as_posix() for f in files}
    assert 300 < len(files) < 3000
    assert any(n.endswith("/json/decoder.py") for n in names) and any(n.endswith("/os.py") for n in names)
    for f in files:
        assert f.suffix == ".py" and not f.name.startswith("test_")
        assert not {"test", "tests", "idle_test", "site-packages"} & set(f.parts), f
    assert not any(n.endswith("pydoc_data/topics.py") for n in names)


def test_default_corpus_dir(monkeypatch):
    monkeypatch.setenv("GPT_DATA_DIR", "/some/where")
    assert default_corpus_dir() == Path("/some/where")
    monkeypatch.delenv("GPT_DATA_DIR")
    expected = f"stdlib-py{sys.version_info.major}{sys.version_info.minor}"
    assert default_corpus_dir() == Path.home() / ".cache" / "gpt_triton" / expected


def test_ensure_default_corpus(tmp_path, monkeypatch):
    monkeypatch.setenv("GPT_DATA_DIR", str(tmp_path / "corpus"))
    folder = ensure_default_corpus(verbose=False)
    assert folder == tmp_path / "corpus"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["splits"]["train"]["tokens"] > 2_000_000 and manifest["splits"]["val"]["tokens"] > 50_000
    x, _ = DataLoader(folder, "val", 4, 64).next_batch()
    text = decode(x.flatten().tolist())
    assert text.startswith("<|endoftext|>")
    start = text.removeprefix("<|endoftext|>")[:200]  # well inside the batch: no character cut in two
    assert any(path.read_text().startswith(start) for path in default_corpus_files())

    monkeypatch.setattr(corpus_module, "prepare_sources", lambda *a, **k: pytest.fail("prepared twice"))
    assert ensure_default_corpus(verbose=False) == folder


# ----------------------------------------------------------------------------------------------------
# The loader


def make_shards(folder: Path, split: str, lengths, name="d") -> Path:
    """Shards whose tokens say where they are: shard i holds i*10000, i*10000+1, ..."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, n in enumerate(lengths):
        write_shard(folder / f"{name}_{split}_{i:06d}.bin", i * 10_000 + np.arange(n))
    return folder


def batches(loader, n):
    return [loader.next_batch() for _ in range(n)]


def expected_windows(lengths, order, step, read, epochs=1):
    """Start tokens of each read, as build-nanogpt's loader takes them: whole steps of every shard in order."""
    starts = []
    for _ in range(epochs):
        for shard in order:
            position = 0
            while position + step + 1 <= lengths[shard]:
                starts.append(shard * 10_000 + position + read)
                position += step
    return starts


def test_batch_shapes_and_shift(tmp_path):
    folder = make_shards(tmp_path, "train", [500])
    loader = DataLoader(folder, "train", 3, 8)
    x, y = loader.next_batch()
    assert x.shape == y.shape == (3, 8) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y.flatten()[:-1], x.flatten()[1:])  # one contiguous window, y shifted by one
    assert x.flatten().tolist() == list(range(24)) and y[-1, -1] == 24
    assert loader.tokens_per_batch == 24
    assert torch.equal(next(iter(loader))[0].flatten(), torch.arange(24, 48))


def test_walks_shards_in_order_then_wraps(tmp_path):
    lengths = [100, 57, 80]  # 57 tokens: reads at 0 and 24 (25 tokens each); the last 8 are never read
    folder = make_shards(tmp_path, "val", lengths)
    loader = DataLoader(folder, "val", 2, 12)
    starts = [x[0, 0].item() for x, _ in batches(loader, 20)]
    expected = expected_windows(lengths, [0, 1, 2], 24, 0, epochs=3)[:20]
    assert starts == expected
    assert loader.epoch == 2


def test_train_order_depends_on_seed_and_epoch_only(tmp_path):
    folder = make_shards(tmp_path, "train", [30] * 5)

    def shard_sequence(seed):
        loader = DataLoader(folder, "train", 1, 28, seed=seed)  # one batch per shard
        return [x[0, 0].item() // 10_000 for x, _ in batches(loader, 15)]

    first = shard_sequence(0)
    assert first == shard_sequence(0)
    epochs = [first[i:i + 5] for i in range(0, 15, 5)]
    assert all(sorted(e) == [0, 1, 2, 3, 4] for e in epochs)  # each epoch visits every shard once
    assert len({tuple(e) for e in epochs}) > 1  # ...in a new order
    assert shard_sequence(1) != first


def test_ranks_read_disjoint_interleaved_windows(tmp_path):
    lengths = [300, 170, 250]
    folder = make_shards(tmp_path, "train", lengths)
    single = DataLoader(folder, "train", 4, 10, seed=3)
    ranks = [DataLoader(folder, "train", 2, 10, rank=r, world_size=2, seed=3) for r in range(2)]
    for _ in range(30):  # several shard changes and an epoch wrap
        x, y = single.next_batch()
        parts = [loader.next_batch() for loader in ranks]
        assert torch.equal(torch.cat([p[0] for p in parts]), x)
        assert torch.equal(torch.cat([p[1] for p in parts]), y)
        assert not set(parts[0][0].flatten().tolist()) & set(parts[1][0].flatten().tolist())


def test_state_dict_resumes_exactly(tmp_path):
    folder = make_shards(tmp_path, "train", [120, 75, 200])
    reference = batches(DataLoader(folder, "train", 2, 16, seed=7), 40)  # about three epochs
    for stop in range(0, 30):
        loader = DataLoader(folder, "train", 2, 16, seed=7)
        batches(loader, stop)
        state = json.loads(json.dumps(loader.state_dict()))  # a plain dict, through any serializer
        resumed = DataLoader(folder, "train", 2, 16, seed=123)  # the state's seed wins
        resumed.load_state_dict(state)
        for (x, y), (rx, ry) in zip(reference[stop:stop + 10], batches(resumed, 10)):
            assert torch.equal(x, rx) and torch.equal(y, ry), stop


def test_state_from_other_data_is_refused(tmp_path):
    state = DataLoader(make_shards(tmp_path / "a", "train", [100, 100]), "train", 2, 8).state_dict()
    other = DataLoader(make_shards(tmp_path / "b", "train", [100, 100, 100]), "train", 2, 8)
    with pytest.raises(DataError, match="saved for other train shards"):
        other.load_state_dict(state)
    with pytest.raises(DataError, match="not a DataLoader state"):
        other.load_state_dict({"epoch": 0})


def test_out_of_vocabulary_ids_are_refused(tmp_path):
    folder = make_shards(tmp_path, "val", [100, 100])  # the second shard holds ids 10000..10099
    loader = DataLoader(folder, "val", 2, 8, vocab_size=10_050)
    with pytest.raises(DataError, match=r"d_val_000001\.bin: token id 10099 is outside the vocabulary \(vocab_size 10050"):
        batches(loader, 10)
    write_shard(tmp_path / "big" / "x_train.bin", [1, 2, 50257, 3])
    with pytest.raises(DataError, match="x_train.bin: token id 50257"):
        DataLoader(tmp_path / "big", "train", 1, 2)


def test_short_shards_are_skipped(tmp_path):
    folder = make_shards(tmp_path, "val", [100, 10, 100])
    with pytest.warns(UserWarning, match="d_val_000001.bin"):
        loader = DataLoader(folder, "val", 2, 8)
    shards = {x[0, 0].item() // 10_000 for x, _ in batches(loader, 20)}
    assert shards == {0, 2}
    with pytest.raises(DataError, match="no val shard in .* holds the 401 tokens one step needs.*longest has 100"):
        DataLoader(folder, "val", 4, 100)


def test_loader_reads_nanogpt_and_npy_folders(tmp_path):
    np.arange(200, dtype=np.uint16).tofile(tmp_path / "train.bin")
    np.save(tmp_path / "shard_val_000000.npy", np.arange(200, dtype=np.int32))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for split in ("train", "val"):
            x, _ = DataLoader(tmp_path, split, 2, 8).next_batch()
            assert x.flatten().tolist() == list(range(16))


def test_loader_errors(tmp_path):
    with pytest.raises(DataError, match=f"no train shards in {tmp_path}"):
        DataLoader(tmp_path, "train", 2, 8)
    make_shards(tmp_path, "train", [100])
    with pytest.raises(DataError, match="rank 2 is outside"):
        DataLoader(tmp_path, "train", 2, 8, rank=2, world_size=2)
    with pytest.raises(DataError, match="batch_size must be a positive integer"):
        DataLoader(tmp_path, "train", 0, 8)


# ----------------------------------------------------------------------------------------------------
# Command line


def test_cli_prepare_and_info(corpus, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["prepare", str(corpus), "--out", str(out), "--name", "toy", "--workers", "1"]) == 0
    assert main(["info", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "toy_train_000000.bin" in printed and "toy_val_000000.bin" in printed
    assert main(["prepare", str(corpus)]) == 2
    assert capsys.readouterr().err == "error: prepare: --out DIR is required when inputs are given\n"


def test_cli_errors_are_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "gpt.data", "info", str(tmp_path)], capture_output=True,
                            text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 2
    assert result.stderr.startswith("error: no shards in") and "Traceback" not in result.stderr


# Raw shards of 0 to 1023 bytes, every size class: llm.c's header does not fit, so the file is
# either the start of a truncated llm.c shard or nanoGPT's header-less uint16 tokens.
MAGIC = np.array([20240520], dtype="<i4").tobytes()
SMALL_SHARDS = {
    "0 bytes": (b"", "empty shard"),
    "1 byte": (b"\x07", "truncated shard: 1 bytes is not a whole number of uint16 tokens"),
    "2 bytes of the magic": (MAGIC[:2], "truncated shard: its 2 bytes are the start of llm.c's magic"),
    "3 bytes of the magic": (MAGIC[:3], "truncated shard: its 3 bytes are the start of llm.c's magic"),
    "2 bytes, one token": (np.array([5], "<u2").tobytes(), None),
    "2 bytes, an id outside the vocabulary": (b"\xff\xff", "token id 65535 is outside the vocabulary"),
    "the magic alone": (MAGIC, "truncated shard: 4 bytes, shorter than llm.c's 1024-byte header"),
    "1023 bytes of header": (MAGIC + bytes(1019), "truncated shard: 1023 bytes, shorter than llm.c's 1024-byte header"),
    "1023 bytes, no magic": (bytes(1023), "truncated shard: 1023 bytes is not a whole number of uint16 tokens"),
    "1022 bytes of tokens": (np.arange(511, dtype="<u2").tobytes(), None),
}


@pytest.mark.parametrize("case", list(SMALL_SHARDS))
def test_verify_small_raw_shards_on_the_command_line(tmp_path, case):
    content, problem = SMALL_SHARDS[case]
    (tmp_path / "x_train_000000.bin").write_bytes(content)
    result = subprocess.run([sys.executable, "-m", "gpt.data", "verify", str(tmp_path)], capture_output=True,
                            text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert "Traceback" not in result.stderr
    if problem is None:
        assert result.returncode == 0 and result.stdout.rstrip().endswith("OK"), result.stdout + result.stderr
        return
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(f"error: {tmp_path}: 1 problem(s): ")
    assert f"x_train_000000.bin: {problem}" in result.stderr, result.stderr
    [line] = [line for line in result.stdout.splitlines() if "x_train_000000.bin: " in line]
    assert f"CORRUPT: {problem}" in line
