"""Bits per byte, the quick start's held-out figure and its unigram baseline, against counts written out here."""

import collections
import json
import math

import numpy as np
import pytest

import k2jax


def test_unigram_bits_per_byte_is_the_smoothed_count_model(small_tokenizer, tmp_path):
    from k2jax.inference.bits import unigram_bits_per_byte

    tok = small_tokenizer
    train = ["the cat sat on the mat", "the dog sat", "a cat and a dog"]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in train))
    counts = collections.Counter(i for t in train for i in tok.encode(t))
    total = sum(counts.values()) + tok.vocab_size  # add-one over the whole vocabulary
    text = "the cat and the dog"
    want = -sum(math.log2((counts[i] + 1) / total) for i in tok.encode(text)) / len(text.encode())
    assert unigram_bits_per_byte(tok, str(path), text) == pytest.approx(want, rel=1e-12)


def test_a_random_model_scores_near_the_uniform_bound_and_the_held_out_text_is_unseen(tiny_config, small_tokenizer):
    """A random model's logits are near uniform: log2(vocab) bits per scored token (an analytic count), within
    2%; the held-out text of the quick start follows the training corpus and shares no document with it."""
    import jax

    from k2jax.data.corpus import heldout_text, iter_documents
    from k2jax.inference.bits import model_bits_per_byte

    model = k2jax.random_model(tiny_config, k2jax.make_mesh("", devices=jax.devices()[:1]), seed=0)
    model.attach_tokenizer(small_tokenizer)
    text = " ".join(f"item {i} of the list" for i in range(200))
    ids = small_tokenizer.encode(text)
    n = (len(ids) // 64) * 64
    scored = np.asarray(ids[:n]).reshape(-1, 64)[:, 1:].ravel().tolist()
    uniform = math.log2(tiny_config.vocab_size) * len(scored) / len(small_tokenizer.decode_bytes(scored))
    assert model_bits_per_byte(model, text, seq=64) == pytest.approx(uniform, rel=0.02)
    held = heldout_text(num_bytes=4096, min_bytes=20_000)
    corpus = list(iter_documents(20_000))
    assert 3000 < len(held.encode()) <= 4096 and not any(held[:200] in d for d in corpus)
