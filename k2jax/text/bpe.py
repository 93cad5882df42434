"""A small byte-level BPE trainer producing K2-format tokenizers (for tests and the quick start)."""

from __future__ import annotations

import collections
import heapq

import regex

from k2jax.errors import ConfigError
from k2jax.text.tokenizer import PATTERN, write_ranks


def train_bpe(text: str, num_ranks: int, *, max_chars: int | None = 2_000_000) -> dict[bytes, int]:
    """Byte-level BPE ranks (256 single bytes, then merges in order) learnt from `text` split by K2's pattern.

    Words are counted once; pair counts are updated incrementally, so a few thousand merges over a few MB
    take seconds. Ties between equally frequent pairs go to the lexicographically smaller pair (deterministic).
    """
    if num_ranks < 256:
        raise ConfigError(f"num_ranks must be >= 256 (the single bytes), got {num_ranks}")
    if max_chars is not None:
        text = text[:max_chars]
    counts = collections.Counter(regex.findall(PATTERN, text))
    words = [[bytes([b]) for b in w.encode("utf-8")] for w in counts]
    freq = list(counts.values())
    pair_count: collections.Counter = collections.Counter()
    where: dict[tuple[bytes, bytes], set[int]] = collections.defaultdict(set)
    for i, w in enumerate(words):
        for a, b in zip(w, w[1:]):
            pair_count[(a, b)] += freq[i]
            where[(a, b)].add(i)
    ranks = {bytes([b]): b for b in range(256)}
    heap = [(-c, p) for p, c in pair_count.items()]
    heapq.heapify(heap)
    while len(ranks) < num_ranks and heap:
        neg, pair = heapq.heappop(heap)
        if pair_count.get(pair, 0) != -neg or -neg <= 0:
            continue  # stale entry
        merged = pair[0] + pair[1]
        if merged in ranks:
            pair_count[pair] = 0
            continue
        ranks[merged] = len(ranks)
        changed = collections.Counter()
        for i in list(where.pop(pair, ())):
            w, f = words[i], freq[i]
            j, out = 0, []
            while j < len(w):
                if j + 1 < len(w) and w[j] == pair[0] and w[j + 1] == pair[1]:
                    out.append(merged)
                    j += 2
                else:
                    out.append(w[j])
                    j += 1
            for a, b in zip(w, w[1:]):
                changed[(a, b)] -= f
            for a, b in zip(out, out[1:]):
                changed[(a, b)] += f
                where[(a, b)].add(i)
            words[i] = out
        pair_count[pair] = 0
        for p, d in changed.items():
            if d:
                pair_count[p] += d
                heapq.heappush(heap, (-pair_count[p], p))
    return ranks


def train_tokenizer_file(text: str, path: str, num_ranks: int, **kw) -> str:
    """Trains ranks on `text` and writes them to `path` in tiktoken.model format; returns path."""
    write_ranks(path, train_bpe(text, num_ranks, **kw))
    return path
