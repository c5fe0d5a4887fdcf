"""Run a command line with one fault injected into file I/O, the way a full disk or a permission
problem would show it, for the reliability tests:

    python tests/fault_injector.py enospc .ckpt_0000004.pt.tmp- train_gpt2.py --max-steps 6 ...
    python tests/fault_injector.py eacces _train_ -m gpt.evaluate --checkpoint ...

``enospc MATCH``: a file opened for writing whose path contains MATCH takes its first 256 bytes, then
every further write fails with ENOSPC (No space left on device), as on a disk that fills up.
``eacces MATCH``: opening a path that contains MATCH fails with EACCES (Permission denied), as
for a user without the right to read it; the tests run as root, which no chmod stops.

The rest of the command line runs as ``python SCRIPT ARGS`` or ``python -m MODULE ARGS`` would.
"""

import builtins
import errno
import io
import os
import runpy
import sys

import numpy as np

ALLOWED_BYTES = 256  # less than any manifest, so its first write fails too


class _FillingFile:
    """A file whose writes fail with ENOSPC once ``ALLOWED_BYTES`` have been written."""

    def __init__(self, file):
        self._file = file
        self._written = 0

    def write(self, data):
        if self._written + len(data) > ALLOWED_BYTES:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._written += len(data)
        return self._file.write(data)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._file.close()
        return False

    def __getattr__(self, name):
        return getattr(self._file, name)


def install(fault: str, match: str) -> None:
    real_open, real_fromfile = builtins.open, np.fromfile

    def matches(path) -> bool:
        return isinstance(path, (str, os.PathLike)) and match in os.fspath(path)

    def faulty_open(file, mode="r", *args, **kwargs):
        if fault == "eacces" and matches(file):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(file))
        opened = real_open(file, mode, *args, **kwargs)
        if fault == "enospc" and matches(file) and any(c in mode for c in "wax+"):
            return _FillingFile(opened)
        return opened

    def faulty_fromfile(file, *args, **kwargs):  # numpy opens the file in C, past builtins.open
        if fault == "eacces" and matches(file):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(file))
        return real_fromfile(file, *args, **kwargs)

    builtins.open = io.open = faulty_open
    np.fromfile = faulty_fromfile


if __name__ == "__main__":
    fault, match, *command = sys.argv[1:]
    if fault not in ("enospc", "eacces") or not command:
        sys.exit(__doc__)
    install(fault, match)
    if command[0] == "-m":
        sys.argv = [command[1], *command[2:]]
        runpy.run_module(command[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = command
        sys.path.insert(0, os.path.dirname(os.path.abspath(command[0])))
        runpy.run_path(command[0], run_name="__main__")
