"""MinHash signatures in pure Python: the CPU-heavy work of the demo.

A signature estimates the Jaccard similarity of two texts' word 3-grams:
the share of equal positions in two signatures. About 10 ms per product page.
"""

from __future__ import annotations

import random
import zlib

NUM_PERM = 80
_PRIME = (1 << 61) - 1
_MAX_HASH = (1 << 32) - 1
_rng = random.Random(42)
_PERMUTATIONS = [(_rng.randrange(1, _PRIME), _rng.randrange(0, _PRIME)) for _ in range(NUM_PERM)]


def shingles(text: str, size: int = 3) -> set[str]:
    words = text.lower().split()
    return {" ".join(words[i : i + size]) for i in range(max(1, len(words) - size + 1))}


def signature(text: str) -> list[int]:
    hashes = [zlib.crc32(s.encode()) for s in shingles(text)]
    return [min((a * h + b) % _PRIME & _MAX_HASH for h in hashes) for a, b in _PERMUTATIONS]


def similarity(a: list[int], b: list[int]) -> float:
    return sum(x == y for x, y in zip(a, b, strict=True)) / len(a)
