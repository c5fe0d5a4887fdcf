"""Integer helpers for the launchers, on the host.

``triton.cdiv`` and ``triton.next_power_of_2`` are constexpr functions, made to be called from
kernels as well: every host call unwraps its arguments first, about 5 µs each on this project's CI
CPU, and a GPT-2 micro-step's launchers made over 300 of them (~1.7 ms of host time). These are the
same functions on Python ints.
"""

from __future__ import annotations


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for ints."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= ``n`` (0 for 0, as ``triton.next_power_of_2``)."""
    return 0 if n <= 0 else 1 << (n - 1).bit_length()
