"""Chat SFT data: JSONL conversations in K2's chat format, each token weighted 1 where the assistant generates it.

One conversation per line: {"messages": [...], "tools": [...]} with roles system / user / assistant / tool,
assistant `tool_calls`, tool results with `tool_call_id`, and `name` on messages. Every record is checked when
the file is opened, before any training: a malformed one stops with FILE:LINE and the reason, or is skipped and
counted (`on_bad="skip"`). A conversation longer than the sequence length is dropped, or truncated after the
last whole turn that fits (`on_long`); both are counted.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import grain
import numpy as np

from k2jax import storage
from k2jax.errors import ChatFormatError, DataError
from k2jax.text.chat import ChatTemplate

ROLES = ("system", "user", "assistant", "tool")


def check_record(record: Any) -> str | None:
    """Why `record` is not a conversation k2jax can train on, or None."""
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    messages, tools = record.get("messages"), record.get("tools")
    if not isinstance(messages, list) or not messages:
        return "'messages' must be a non-empty list"
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        return "'tools' must be a list of objects"
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            return f"{where}: expected an object"
        role = m.get("role")
        if role not in ROLES:
            return f"{where}: unknown role {role!r} (expected one of {', '.join(ROLES)})"
        content = m.get("content")
        if not isinstance(content, str) and not (role == "assistant" and content is None and m.get("tool_calls")):
            return f"{where} ({role}): 'content' must be a string, got {type(content).__name__}"
        if "name" in m and not isinstance(m["name"], str):
            return f"{where} ({role}): 'name' must be a string"
        if role == "tool" and not isinstance(m.get("tool_call_id"), str):
            return f"{where} (tool): a tool result needs a string 'tool_call_id'"
        for j, call in enumerate(m.get("tool_calls") or []):
            fn = call.get("function") if isinstance(call, dict) else None
            if role != "assistant" or not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                return f"{where}: tool_calls[{j}] needs 'function.name' (and only assistants call tools)"
            if not isinstance(fn.get("arguments", {}), (str, dict)):
                return f"{where}: tool_calls[{j}].function.arguments must be a JSON string or object"
    if not any(m["role"] == "assistant" for m in messages):
        return "no assistant message: nothing to learn"
    return None


def weighted_tokens(turns, tokenizer) -> list[tuple[np.ndarray, np.ndarray]]:
    """(token ids, loss weights) per turn of `render_segments`' output."""
    out = []
    for turn in turns:
        ids, weights = [], []
        for text, generated in turn:
            piece = tokenizer.encode(text, allow_special="all")
            ids += piece
            weights += [1 if generated else 0] * len(piece)
        out.append((np.asarray(ids, np.int32), np.asarray(weights, np.int32)))
    return out


@dataclasses.dataclass
class ChatCounts:
    """What opening a chat file found: conversations kept, truncated, dropped as too long, skipped as bad."""

    kept: int = 0
    truncated: int = 0
    dropped_long: int = 0
    skipped_bad: list = dataclasses.field(default_factory=list)  # line numbers

    def summary(self, path: str) -> str:
        bad = f", skipped {len(self.skipped_bad)} malformed (first at line {self.skipped_bad[0]})" \
            if self.skipped_bad else ""
        return (f"{path}: {self.kept} conversations ({self.truncated} truncated at a turn boundary), "
                f"dropped {self.dropped_long} longer than the sequence{bad}")


class ChatSource(grain.sources.RandomAccessDataSource):
    """Conversations of a JSONL file as {"tokens", "weights"} (int32), each at most `seq_len` tokens."""

    weighted = True  # make_dataset packs its items whole, weights with their tokens

    def __init__(self, path: str, tokenizer_path: str, seq_len: int, *, on_long: str = "drop",
                 on_bad: str = "error", chat_template: ChatTemplate | None = None):
        if on_long not in ("drop", "truncate"):
            raise DataError(f"--on_long: expected 'drop' or 'truncate', got {on_long!r}")
        if on_bad not in ("error", "skip"):
            raise DataError(f"--on_bad: expected 'error' or 'skip', got {on_bad!r}")
        if not storage.isfile(path):
            raise DataError(f"data file not found: {path}")
        self.name, self.path = path, storage.local_copy(path)
        self.tokenizer_path, self.seq_len = tokenizer_path, seq_len
        self.template = chat_template or ChatTemplate()  # the checkpoint's jinja2 template, or the built-in one
        self._tok = None
        self.index, self.counts = [], ChatCounts()  # (byte offset, turns kept) of each conversation
        with open(self.path, "rb") as f:
            offset = 0
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    self._add(line, offset, lineno, on_long, on_bad)
                offset += len(line)
        if not self.index:
            raise DataError(f"{path}: no conversation fits --seq={seq_len}; {self.counts.summary(path)}")

    def _add(self, line: bytes, offset: int, lineno: int, on_long: str, on_bad: str):
        try:
            record = json.loads(line)
            reason = check_record(record)
            turns = None if reason else self._turns(record)
        except json.JSONDecodeError as e:
            reason = f"not valid JSON ({e.msg})"
        except (ChatFormatError, UnicodeDecodeError) as e:
            reason = str(e)
        if reason:
            if on_bad == "skip":
                self.counts.skipped_bad.append(lineno)
                return
            raise DataError(f"{self.name}:{lineno}: {reason} (--on_bad=skip skips and counts such records)")
        lengths = np.cumsum([len(ids) for ids, _ in turns])
        keep = len(turns)
        if lengths[-1] > self.seq_len:
            if on_long == "drop":
                self.counts.dropped_long += 1
                return
            trained = np.cumsum([w.sum() > 0 for _, w in turns])  # assistant turns up to each turn
            fits = [k for k in range(1, len(turns) + 1) if lengths[k - 1] <= self.seq_len and trained[k - 1]]
            if not fits:
                self.counts.dropped_long += 1
                return
            keep = fits[-1]
            self.counts.truncated += 1
        self.counts.kept += 1
        self.index.append((offset, keep))

    def _turns(self, record):
        if self._tok is None:
            from k2jax.text.tokenizer import load_tokenizer

            self._tok = load_tokenizer(self.tokenizer_path)
        turns = self.template.segments(record["messages"], record.get("tools"), add_generation_prompt=False)
        return weighted_tokens(turns, self._tok)

    def __getstate__(self):  # grain workers load the tokenizer themselves
        return {**self.__dict__, "_tok": None}

    def __len__(self):
        return len(self.index)

    def __getitem__(self, i):
        offset, keep = self.index[i]
        with open(self.path, "rb") as f:
            f.seek(offset)
            turns = self._turns(json.loads(f.readline()))[:keep]
        return {"tokens": np.concatenate([t for t, _ in turns]), "weights": np.concatenate([w for _, w in turns])}

    def __repr__(self):
        return f"ChatSource({self.name!r}, {len(self)} conversations)"
