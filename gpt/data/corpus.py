"""The embedded default corpus: the running Python's standard library, prepared on first use.

Its sources (without their tests and installed packages) and the reference manual's prose from
``pydoc_data``, about 5.4M GPT-2 tokens: a corpus every machine has, so nothing is downloaded.
"""

from __future__ import annotations

import os
import sys
import sysconfig
from pathlib import Path

from gpt.data.pipeline import DEFAULT_SHARD_TOKENS, DEFAULT_VAL_FRACTION, prepare_sources
from gpt.data.shards import MANIFEST
from gpt.data.tasks import Source

DEFAULT_CORPUS_NAME = "stdlib"
# Folders of the standard library that hold its own tests or installed packages, not library code.
_STDLIB_EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages"}
_PYDOC_TOPICS_DOCUMENTS = 8  # the pydoc topics text is split into this many documents


def default_corpus_files() -> list[Path]:
    """Every ``.py`` file of the running Python's standard library, without its tests and installed
    packages, sorted."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    # pydoc_data/topics.py is the topics text as string literals; it joins the corpus as prose instead.
    prose = stdlib / "pydoc_data" / "topics.py"
    files = []
    for root, dirs, names in os.walk(stdlib):
        dirs[:] = [d for d in dirs if d not in _STDLIB_EXCLUDED_DIRS]
        files += [Path(root) / n for n in names if n.endswith(".py") and not n.startswith("test_")]
    return sorted(f for f in files if f != prose)




def _default_corpus_sources() -> list[Source]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    sources = [Source("text", path.relative_to(stdlib).as_posix(), path) for path in default_corpus_files()]
    from pydoc_data.topics import topics

    # The reference manual's prose, in a few documents so that its share of val is about val_fraction.
    names = sorted(topics)
    for i in range(_PYDOC_TOPICS_DOCUMENTS):
        text = "\n\n".join(topics[n] for n in names[i::_PYDOC_TOPICS_DOCUMENTS])
        sources.append(Source("text", f"pydoc_data/topics/{i}", text=text))
    return sources


def default_corpus_dir() -> Path:
    """Where the default corpus's shards live: ``$GPT_DATA_DIR``, else a per-Python-version cache folder."""
    if os.environ.get("GPT_DATA_DIR"):
        return Path(os.environ["GPT_DATA_DIR"]).expanduser()
    return Path.home() / ".cache" / "gpt_triton" / f"stdlib-py{sys.version_info.major}{sys.version_info.minor}"


def prepare_default_corpus(out_dir: Path, *, name: str = DEFAULT_CORPUS_NAME,
                           shard_tokens: int = DEFAULT_SHARD_TOKENS, val_fraction: float = DEFAULT_VAL_FRACTION,
                           workers: int | None = None, verbose: bool = True) -> dict:
    description = f"Python {sys.version.split()[0]} standard library: {sysconfig.get_paths()['stdlib']}"
    return prepare_sources(_default_corpus_sources(), out_dir, description=description, name=name,
                           shard_tokens=shard_tokens, val_fraction=val_fraction, workers=workers, verbose=verbose)


def ensure_default_corpus(verbose: bool = True) -> Path:
    """The default corpus's folder, preparing it first unless its manifest says it is complete."""
    out_dir = default_corpus_dir()
    if (out_dir / MANIFEST).is_file():
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    # Several processes (the ranks of one torchrun) may get here together: one prepares, the others
    # wait for it and then find the manifest.
    with open(out_dir / ".lock", "w") as lock:
        _lock_file(lock)
        if not (out_dir / MANIFEST).is_file():
            if verbose:
                print(f"preparing the default corpus (the Python standard library's sources) in {out_dir}")
            prepare_default_corpus(out_dir, verbose=verbose)
    return out_dir


def _lock_file(file) -> None:
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, concurrent first uses may duplicate the work
        return
    fcntl.flock(file, fcntl.LOCK_EX)

