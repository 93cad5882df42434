"""Bits per byte of a text under a model and under a unigram model of the same tokenizer: a held-out loss that
means something next to its baseline (the quick start prints both)."""

from __future__ import annotations

import json
import math

import numpy as np


def model_bits_per_byte(model, text: str, seq: int = 256, batch: int = 8) -> float:
    """Bits per UTF-8 byte of `text` under `model`: its tokens in consecutive windows of `seq`, each token after
    the first of its window scored (float64 log-softmax over Model.logits), over the bytes of those tokens."""
    tok = model.tokenizer
    ids = np.asarray(tok.encode(text), np.int32)
    n = (len(ids) // seq) * seq
    if n == 0:
        raise ValueError(f"the held-out text has {len(ids)} tokens, fewer than one window of {seq}")
    windows = ids[:n].reshape(-1, seq)
    nats, scored = 0.0, []
    for start in range(0, len(windows), batch):
        rows = windows[start:start + batch]
        logits = np.asarray(model.logits(rows), np.float64)[:, :-1]
        logits -= logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        nats -= np.take_along_axis(logp, rows[:, 1:, None], -1).sum()
        scored.extend(rows[:, 1:].ravel().tolist())
    return nats / math.log(2) / len(tok.decode_bytes(scored))


def unigram_bits_per_byte(tokenizer, train_jsonl: str, text: str, max_bytes: int = 4_000_000) -> float:
    """Bits per byte of `text` under the token frequencies of the training data (the first `max_bytes` of its
    `text` fields, add-one smoothed over the vocabulary): what a model that learned nothing but counts scores."""
    counts = np.ones(tokenizer.vocab_size, np.float64)
    read = 0
    with open(train_jsonl, encoding="utf-8") as f:
        for line in f:
            doc = json.loads(line).get("text", "")
            counts += np.bincount(tokenizer.encode(doc), minlength=tokenizer.vocab_size)[: tokenizer.vocab_size]
            read += len(doc.encode("utf-8"))
            if read >= max_bytes:
                break
    ids = tokenizer.encode(text)
    logp = np.log2(counts / counts.sum())
    return float(-logp[ids].sum() / len(tokenizer.decode_bytes(ids)))
