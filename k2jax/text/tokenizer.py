"""K2's tiktoken tokenizer read from a local `tiktoken.model` file (no remote code, no HF AutoTokenizer)."""

from __future__ import annotations

import base64
import binascii
import bisect
import functools
import os
from typing import Collection, Iterator, Literal

import numpy as np
import tiktoken

from k2jax import storage
from k2jax.errors import TokenizerError

NUM_SPECIAL = 256
# Special tokens at their offsets from the number of BPE ranks (163584 in the official file).
NAMED_SPECIALS = {
    0: "[BOS]", 1: "[EOS]", 2: "<|im_end|>", 3: "<|im_user|>", 4: "<|im_assistant|>", 6: "<|start_header_id|>",
    7: "<|end_header_id|>", 9: "[EOT]", 10: "<|im_system|>", 11: "<|tool_calls_section_begin|>",
    12: "<|tool_calls_section_end|>", 13: "<|tool_call_begin|>", 14: "<|tool_call_argument_begin|>",
    15: "<|tool_call_end|>", 17: "<|im_middle|>", 254: "[UNK]", 255: "[PAD]",
}

# K2's pre-tokenisation pattern as published (uses `&&` class intersection, which tiktoken's engine lacks).
ORIGINAL_PATTERN = "|".join([
    r"""[\p{Han}]+""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
])

# The same pattern without intersection: "[A&&[^Han]]" becomes "(?:(?!\p{Han})[A])", one character that is in
# class A and is not Han (a negative lookahead on the character about to be matched).
_UPPER = r"(?:(?!\p{Han})[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}])"
_LOWER = r"(?:(?!\p{Han})[\p{Ll}\p{Lm}\p{Lo}\p{M}])"
PATTERN = "|".join([
    r"""[\p{Han}]+""",
    rf"""[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    rf"""[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
])

# Bounded pieces for very long inputs, as the reference tokenizer does.
MAX_ENCODE_CHARS = 400_000
MAX_RUN_CHARS = 25_000


def read_ranks(path: str) -> dict[bytes, int]:
    """Parses a `tiktoken.model` file (`<base64 bytes> <rank>` per line); errors name the line number."""
    if not storage.isfile(path):
        raise TokenizerError(f"tokenizer file not found: {path}")
    ranks: dict[bytes, int] = {}
    seen: dict[int, int] = {}
    with storage.open_file(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 2:
                raise TokenizerError(f"{path}:{lineno}: expected '<base64 bytes> <rank>', got {line[:80]!r}")
            try:
                token = base64.b64decode(parts[0], validate=True)
                rank = int(parts[1])
            except (binascii.Error, ValueError):
                raise TokenizerError(f"{path}:{lineno}: malformed token or rank: {line[:80]!r}") from None
            if rank in seen:
                raise TokenizerError(f"{path}:{lineno}: rank {rank} already given on line {seen[rank]}")
            if token in ranks:
                raise TokenizerError(f"{path}:{lineno}: token {token!r} appears twice")
            seen[rank] = lineno
            ranks[token] = rank
    if not ranks:
        raise TokenizerError(f"{path}: no tokens")
    if sorted(seen) != list(range(len(seen))):
        missing = next(i for i, r in enumerate(sorted(seen)) if i != r)
        raise TokenizerError(f"{path}: ranks must be 0..{len(seen) - 1} without gaps; rank {missing} is missing")
    return ranks


def write_ranks(path: str, ranks: dict[bytes, int]) -> None:
    """Writes ranks in the `tiktoken.model` format (atomically)."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            f.write(base64.b64encode(token) + b" " + str(rank).encode() + b"\n")
    os.replace(tmp, path)


def special_tokens(num_base: int) -> dict[str, int]:
    """K2's block of 256 special tokens after `num_base` ranks (unnamed ones are <|reserved_token_{id}|>)."""
    return {NAMED_SPECIALS.get(i, f"<|reserved_token_{num_base + i}|>"): num_base + i for i in range(NUM_SPECIAL)}


def _split_runs(s: str, max_run: int) -> Iterator[str]:
    """Splits s so that no piece holds more than max_run consecutive whitespace or non-whitespace chars."""
    start, run, kind = 0, 0, None
    for i, ch in enumerate(s):
        k = ch.isspace()
        run = run + 1 if k == kind else 1
        kind = k
        if run > max_run:
            yield s[start:i]
            start, run = i, 1
    yield s[start:]


class Tokenizer:
    """K2 tokenizer: tiktoken BPE with K2's pattern and special tokens (`encoding` is the tiktoken.Encoding)."""

    def __init__(self, path: str):
        ranks = read_ranks(path)
        self.path = path
        self.num_base = len(ranks)
        self.special_tokens = special_tokens(self.num_base)
        self.encoding = tiktoken.Encoding(name=f"k2:{os.path.basename(path)}", pat_str=PATTERN,
                                          mergeable_ranks=ranks, special_tokens=self.special_tokens)
        self.bos_id = self.special_tokens["[BOS]"]
        self.eos_id = self.special_tokens["[EOS]"]
        self.pad_id = self.special_tokens["[PAD]"]
        self.unk_id = self.special_tokens["[UNK]"]
        self.im_end_id = self.special_tokens["<|im_end|>"]

    @property
    def vocab_size(self) -> int:
        return self.num_base + NUM_SPECIAL

    def encode(self, text: str, *, allow_special: Literal["all", "none"] | Collection[str] = "none",
               bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of text. Special-token text is encoded as plain text unless allowed ('all' or a set).

        Lone surrogates (not valid Unicode) are replaced by U+FFFD, as tiktoken does.
        """
        allowed = set() if allow_special == "none" else allow_special
        ids = [self.bos_id] if bos else []
        for chunk_start in range(0, max(len(text), 1), MAX_ENCODE_CHARS):
            chunk = text[chunk_start: chunk_start + MAX_ENCODE_CHARS]
            for piece in _split_runs(chunk, MAX_RUN_CHARS):
                ids.extend(self.encoding.encode(piece, allowed_special=allowed, disallowed_special=()))
        if eos:
            ids.append(self.eos_id)
        return ids

    @functools.cached_property
    def _by_bytes(self) -> tuple[list[bytes], np.ndarray]:
        """The ordinary tokens' bytes, sorted, and their ids: the prefix index token healing looks up (built once
        per tokenizer, then a binary search per prompt)."""
        pairs = sorted((self.encoding.decode_single_token_bytes(i), i) for i in range(self.num_base))
        return [b for b, _ in pairs], np.asarray([i for _, i in pairs], np.int32)

    def tokens_starting_with(self, prefix: bytes) -> np.ndarray:
        """Ids of the ordinary tokens whose bytes start with `prefix` (sorted by their bytes)."""
        keys, ids = self._by_bytes
        lo = bisect.bisect_left(keys, prefix)
        hi = lo
        while hi < len(keys) and keys[hi].startswith(prefix):
            hi += 1
        return ids[lo:hi]

    def heal(self, ids: list[int]) -> tuple[list[int], np.ndarray | None, bytes]:
        """Token healing: (prompt without its last token, the first token's allowed ids, the bytes removed) when
        longer tokens start with the last token's text (a prompt ending in a space, half a word or half a number
        was cut where the text would not be); else (ids, None, b""). A special last token is never healed."""
        if len(ids) < 2 or ids[-1] >= self.num_base:
            return list(ids), None, b""
        tail = self.encoding.decode_single_token_bytes(ids[-1])
        allowed = self.tokens_starting_with(tail)
        if len(allowed) < 2:
            return list(ids), None, b""
        return list(ids[:-1]), allowed, tail

    def decode(self, ids) -> str:
        """Text of ids; bytes that are not valid UTF-8 (a cut multi-byte char) become U+FFFD."""
        return self.encoding.decode([int(i) for i in ids], errors="replace")

    def decode_bytes(self, ids) -> bytes:
        return self.encoding.decode_bytes([int(i) for i in ids])

    def check_model(self, config) -> None:
        """Raises if the vocabulary does not fit the model config (ids must be < vocab_size)."""
        if self.vocab_size > config.vocab_size:
            raise TokenizerError(f"tokenizer {self.path} has {self.vocab_size} ids but config field 'vocab_size' "
                                 f"is {config.vocab_size}; expected a vocabulary of at most {config.vocab_size}")
        for field, tid in (("bos_token_id", self.bos_id), ("eos_token_id", self.eos_id)):
            if getattr(config, field) is not None and getattr(config, field) != tid:
                raise TokenizerError(f"tokenizer {self.path}: [{field[:3].upper()}] is id {tid} but config field "
                                     f"'{field}' is {getattr(config, field)}")


def load_tokenizer(path: str) -> Tokenizer:
    """Loads a K2-format tiktoken.model file (the official one or one made by `train_bpe`)."""
    return Tokenizer(path)
