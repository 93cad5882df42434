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

    Roles: system, user, assistant (optionally with `tool_calls`), tool (`tool_call_id`). A message's `name`
    replaces its role in the header (`<|im_user|>alice<|im_middle|>`), as in the official template; a tool
    result without one is headed `tool`.
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
        header = m.get("name") or role  # as the official template: a message's name replaces its role's
        if role == "system":
            turns.append([(f"<|im_system|>{header}<|im_middle|>{_content_text(m.get('content'), where)}<|im_end|>",
                           False)])
        elif role == "user":
            turns.append([(f"<|im_user|>{header}<|im_middle|>{_content_text(m.get('content'), where)}<|im_end|>",
                           False)])
        elif role == "assistant":
            text = _content_text(m.get("content"), where)
            calls = m.get("tool_calls") or []
            if calls:
                text += ("<|tool_calls_section_begin|>"
                         + "".join(_tool_call_text(c, j, where) for j, c in enumerate(calls))
                         + "<|tool_calls_section_end|>")
            turns.append([(f"<|im_assistant|>{header}<|im_middle|>", False), (text + "<|im_end|>", True)])
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


# ------------------------------------------------------------------------------------------------ templates
_TURN = re.compile(r"(<\|im_(?:system|user|assistant)\|>)(.*?<\|im_middle\|>)(.*?<\|im_end\|>)?", re.DOTALL)


def segments_from_text(text: str) -> list[list[tuple[str, bool]]]:
    """`render_segments`' form of a rendered conversation: one turn per `<|im_...|>header<|im_middle|>body
    <|im_end|>`, the body of assistant turns (through its <|im_end|>) marked generated; text between turns kept,
    not generated. A trailing header without a body (the generation prompt) is its own turn."""
    turns, pos = [], 0
    for m in _TURN.finditer(text):
        if m.start() > pos:
            turns.append([(text[pos:m.start()], False)])
        header, body = m.group(1) + m.group(2), m.group(3) or ""
        if m.group(1) == "<|im_assistant|>":
            turns.append([(header, False)] + ([(body, True)] if body else []))
        else:
            turns.append([(header + body, False)])
        pos = m.end()
    if pos < len(text):
        turns.append([(text[pos:], False)])
    return turns


class ChatTemplate:
    """How conversations are rendered: the jinja2 template that ships with a checkpoint (rendered with the settings
    transformers uses), or k2jax's built-in K2 renderer. `source` says which."""

    def __init__(self, template: str | None = None, source: str = "built-in"):
        self.template, self.source = template, source
        self._compiled = None
        if template is not None:
            import jinja2
            import jinja2.ext
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message):
                raise jinja2.exceptions.TemplateError(message)

            def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
                return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                                  sort_keys=sort_keys)

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=[jinja2.ext.loopcontrols])
            env.filters["tojson"] = tojson
            env.globals["raise_exception"] = raise_exception
            try:
                self._compiled = env.from_string(template)
            except jinja2.exceptions.TemplateSyntaxError as e:
                raise ChatFormatError(f"chat template {source}, line {e.lineno}: {e.message}") from None

    def __getstate__(self):  # grain workers rebuild the compiled template
        return {"template": self.template, "source": self.source}

    def __setstate__(self, state):
        self.__init__(state["template"], state["source"])

    def render(self, messages, tools=None, add_generation_prompt: bool = True) -> str:
        """The conversation as text (encode with allow_special='all')."""
        if self._compiled is None:
            return apply_chat_template(messages, tools, add_generation_prompt)
        import jinja2

        try:
            return self._compiled.render(messages=list(messages), tools=list(tools) if tools else None,
                                         add_generation_prompt=add_generation_prompt)
        except jinja2.exceptions.TemplateError as e:
            raise ChatFormatError(f"chat template {self.source}: {e}") from None

    def segments(self, messages, tools=None, add_generation_prompt: bool = False):
        """`render_segments`' turns: the built-in renderer's own, or those of the template's text."""
        if self._compiled is None:
            return render_segments(messages, tools, add_generation_prompt)
        return segments_from_text(self.render(messages, tools, add_generation_prompt))


def load_chat_template(path: str = "", near: tuple[str, ...] = ()) -> ChatTemplate:
    """The chat template: `path` (a .jinja file, or an HF folder), else the first HF folder in `near` that ships
    one (`chat_template.jinja`, or `chat_template` in `tokenizer_config.json`), else the built-in renderer."""
    from k2jax import storage

    def from_folder(folder: str) -> ChatTemplate | None:
        jinja = storage.join(folder, "chat_template.jinja")
        if storage.isfile(jinja):
            return ChatTemplate(storage.read_text(jinja), jinja)
        config = storage.join(folder, "tokenizer_config.json")
        if storage.isfile(config):
            try:
                value = json.loads(storage.read_text(config)).get("chat_template")
            except json.JSONDecodeError as e:
                raise ChatFormatError(f"{config}: not valid JSON ({e.msg}, line {e.lineno})") from None
            if isinstance(value, list):  # named templates: the default one
                value = next((t.get("template") for t in value if t.get("name") == "default"), None)
            if isinstance(value, str):
                return ChatTemplate(value, f"{config} (chat_template)")
        return None

    if path:
        if storage.isdir(path):
            found = from_folder(path)
            if found is None:
                raise ChatFormatError(f"--chat_template={path}: no chat_template.jinja or tokenizer_config.json "
                                      "chat_template in it")
            return found
        if not storage.isfile(path):
            raise ChatFormatError(f"--chat_template={path}: file not found")
        return ChatTemplate(storage.read_text(path), path)
    for folder in near:
        if folder and storage.isdir(folder):
            found = from_folder(folder)
            if found is not None:
                return found
    return ChatTemplate()


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
