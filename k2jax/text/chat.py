"""K2's chat format: rendering conversations (with tools) and parsing tool calls out of generated text."""

from __future__ import annotations

import json
import re
from typing import Any, Mapping, Sequence

from k2jax.errors import ChatFormatError

DEFAULT_SYSTEM = "You are Kimi, an AI assistant created by Moonshot AI."
GENERATION_PROMPT = "<|im_assistant|>assistant<|im_middle|>"


def _content_text(content: Any, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, Mapping) and part.get("type", "text") == "text" and "text" in part:
                parts.append(part["text"])
            else:
                raise ChatFormatError(f"{where}: only text content parts are supported, got {part!r}")
        return "".join(parts)
    raise ChatFormatError(f"{where}: 'content' must be a string or a list of text parts, got {type(content).__name__}")


def _tool_call_text(call: Mapping[str, Any], index: int, where: str) -> str:
    fn = call.get("function") or {}
    name = fn.get("name")
    call_id = call.get("id") or (f"functions.{name}:{index}" if name else None)
    if not call_id:
        raise ChatFormatError(f"{where}: a tool call needs an 'id' or a 'function.name'")
    args = fn.get("arguments", {})
    if not isinstance(args, str):
        args = json.dumps(args, ensure_ascii=False)
    return f"<|tool_call_begin|>{call_id}<|tool_call_argument_begin|>{args}<|tool_call_end|>"


def render_segments(messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None = None,
                    add_generation_prompt: bool = True) -> list[list[tuple[str, bool]]]:
    """K2's chat format as pieces: one list of (text, generated) per turn, the tool declaration and the default
    system turn first when they apply, then one per message, then the generation prompt. `generated` marks
    the text the assistant produces: its content, its tool-call section and the <|im_end|> closing its turn
    (not the role header). Every piece starts and ends at a special token, so tokenising the pieces one by one
    gives the ids of the whole text.

    Roles: system, user, assistant (optionally with `tool_calls`), tool (`tool_call_id`, optional `name`).
    Tools are declared first as `<|im_system|>tool_declare<|im_middle|>{json}<|im_end|>`; without a leading
    system message the default K2 system turn is inserted.
    """
    turns = []
    if tools:
        turns.append([("<|im_system|>tool_declare<|im_middle|>"
                       + json.dumps(list(tools), separators=(",", ":"), ensure_ascii=False) + "<|im_end|>", False)])
    if not messages or messages[0].get("role") != "system":
        turns.append([(f"<|im_system|>system<|im_middle|>{DEFAULT_SYSTEM}<|im_end|>", False)])
    for i, m in enumerate(messages):
        role = m.get("role")
        where = f"messages[{i}] (role {role!r})"
        if role == "system":
            turns.append([(f"<|im_system|>system<|im_middle|>{_content_text(m.get('content'), where)}<|im_end|>",
                           False)])
        elif role == "user":
            turns.append([(f"<|im_user|>user<|im_middle|>{_content_text(m.get('content'), where)}<|im_end|>", False)])
        elif role == "assistant":
            text = _content_text(m.get("content"), where)
            calls = m.get("tool_calls") or []
            if calls:
                text += ("<|tool_calls_section_begin|>"
                         + "".join(_tool_call_text(c, j, where) for j, c in enumerate(calls))
                         + "<|tool_calls_section_end|>")
            turns.append([(GENERATION_PROMPT, False), (text + "<|im_end|>", True)])
        elif role == "tool":
            if "tool_call_id" not in m:
                raise ChatFormatError(f"{where}: a tool result needs 'tool_call_id'")
            name = m.get("name") or "tool"
            body = f"## Return of {m['tool_call_id']}\n{_content_text(m.get('content'), where)}"
            turns.append([(f"<|im_system|>{name}<|im_middle|>{body}<|im_end|>", False)])
        else:
            raise ChatFormatError(f"{where}: unknown role; expected system, user, assistant or tool")
    if add_generation_prompt:
        turns.append([(GENERATION_PROMPT, False)])
    return turns


def apply_chat_template(messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None = None,
                        add_generation_prompt: bool = True) -> str:
    """Renders OpenAI-style messages in K2's format (encode the result with allow_special='all'); see
    `render_segments` for the roles and the turns."""
    return "".join(text for turn in render_segments(messages, tools, add_generation_prompt) for text, _ in turn)


_SECTION = re.compile(r"<\|tool_calls_section_begin\|>(.*?)(?:<\|tool_calls_section_end\|>|$)", re.DOTALL)
_CALL = re.compile(r"<\|tool_call_begin\|>\s*(?P<id>[^<]+?)\s*<\|tool_call_argument_begin\|>"
                   r"(?P<args>(?:(?!<\|tool_call_begin\|>).)*?)<\|tool_call_end\|>", re.DOTALL)


_CALL_ID = re.compile(r"functions\.(?P<name>.+):(?P<index>\d+)")


def parse_tool_calls(text: str) -> tuple[str, list[dict[str, Any]]]:
    """Splits generated assistant text into (content, tool calls in OpenAI form).

    Each call: {"id": "functions.NAME:IDX", "type": "function", "function": {"name": NAME, "arguments": str}};
    NAME is everything after `functions.` (dots included). A call whose id is not of that form (what vLLM and
    SGLang require) is left in the content as plain text.
    Arguments stay the raw JSON text the model wrote (validate before executing).
    """
    calls = []
    m = _SECTION.search(text)
    if not m:
        return text.replace("<|im_end|>", ""), calls
    content, plain = text[: m.start()], []
    for c in _CALL.finditer(m.group(1)):
        call_id = c.group("id").strip()
        valid = _CALL_ID.fullmatch(call_id)
        if not valid:  # the serving engines accept only functions.NAME:INDEX; anything else stays text
            plain.append(c.group(0))
            continue
        calls.append({"id": call_id, "type": "function",
                      "function": {"name": valid.group("name"), "arguments": c.group("args").strip()}})
    return content + "".join(plain), calls
