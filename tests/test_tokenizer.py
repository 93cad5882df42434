"""K2 tokenizer: pattern rewrite, special tokens at official ids, round trips, long inputs, chat format."""

import base64
import json
import os
import re

import numpy as np
import pytest
import regex

from k2jax.text.chat import apply_chat_template, parse_tool_calls
from k2jax.model.config import load_config
from k2jax.text.tokenizer import ORIGINAL_PATTERN, PATTERN, TokenizerError, load_tokenizer, write_ranks

SAMPLE = (
    "Hello, World! It's a test: we're here, they'll go, I'd say, YOU'VE SEEN IT'S DONE. "
    "naïve café résumé Ærøskøbing ÉCOLE Straße İstanbul\n"
    "汉字和中文标点，还有日本語のかなカタカナ交じり文。한국어 문장도 있습니다. 東京タワー ｶﾀｶﾅ ㄅㄆㄇ\n"
    "Ελληνικά κείμενα και Русский текст, עברית, العربية, हिन्दी देवनागरी, ไทย\n"
    "numbers 1 12 123 1234 12345 3.14159 1,000,000 ٣٤٥ ⅣⅫ\n"
    "punct!!! ??? ... --- ((())) [x] {y} <z> @#$%^&*~` \"quoted\" 'single'\n"
    "whitespace    runs\t\ttabs \r\n windows\r\n\n\n   trailing   \n"
    "combining: e\u0301 a\u0308 n\u0303; emoji 😀🎉👍🏽 and ZWJ 👨‍👩‍👧; mixed aB Ab AB ab xML HTMLParser\n"
    "code: def f(x):\n    return x**2  # comment\n\tif a&&b || c != d: pass\n"
)


def test_pattern_rewrite_splits_like_the_original():
    original = regex.findall(ORIGINAL_PATTERN, SAMPLE, flags=regex.V1)
    rewritten = regex.findall(PATTERN, SAMPLE)
    assert rewritten == original
    assert "".join(rewritten) == SAMPLE
    assert "汉字和中文标点" in rewritten and "かな" in "".join(rewritten)


def test_tiktoken_engine_splits_like_the_pattern(small_tokenizer):
    """tiktoken (its own regex engine) never merges across the pieces that the pattern defines."""
    pieces = regex.findall(ORIGINAL_PATTERN, SAMPLE, flags=regex.V1)
    whole = small_tokenizer.encoding.encode_ordinary(SAMPLE)
    assert whole == [t for p in pieces for t in small_tokenizer.encoding.encode_ordinary(p)]


def test_round_trip_arbitrary_unicode(small_tokenizer):
    rng = np.random.default_rng(0)
    planes = [(0x20, 0x7F), (0xA0, 0x2FF), (0x370, 0x52F), (0x4E00, 0x9FFF), (0x3040, 0x30FF), (0xAC00, 0xD7A3),
              (0x1F300, 0x1F6FF), (0x10000, 0x1FFFF), (0x300, 0x36F)]
    for _ in range(50):
        chars = []
        for _ in range(rng.integers(1, 200)):
            lo, hi = planes[rng.integers(len(planes))]
            chars.append(chr(int(rng.integers(lo, hi))))
        text = "".join(chars) + " \n\t " + "".join(chars[::-1])
        assert small_tokenizer.decode(small_tokenizer.encode(text)) == text
    assert small_tokenizer.decode(small_tokenizer.encode(SAMPLE)) == SAMPLE


def test_lone_surrogates_become_replacement_char(small_tokenizer):
    assert small_tokenizer.decode(small_tokenizer.encode("a\ud800b")) == "a\ufffdb"


def test_special_tokens_at_official_ids(tmp_path):
    ranks = {bytes([i]): i for i in range(256)}
    ranks.update({f"tok{i}".encode(): i for i in range(256, 163584)})
    path = str(tmp_path / "tiktoken.model")
    write_ranks(path, ranks)
    tok = load_tokenizer(path)
    official = {"[BOS]": 163584, "[EOS]": 163585, "<|im_end|>": 163586, "<|im_user|>": 163587,
                "<|im_assistant|>": 163588, "<|start_header_id|>": 163590, "<|end_header_id|>": 163591,
                "[EOT]": 163593, "<|im_system|>": 163594, "<|tool_calls_section_begin|>": 163595,
                "<|tool_calls_section_end|>": 163596, "<|tool_call_begin|>": 163597,
                "<|tool_call_argument_begin|>": 163598, "<|tool_call_end|>": 163599, "<|im_middle|>": 163601,
                "[UNK]": 163838, "[PAD]": 163839, "<|reserved_token_163589|>": 163589,
                "<|reserved_token_163837|>": 163837}
    for name, tid in official.items():
        assert tok.special_tokens[name] == tid
        assert tok.encode(name, allow_special="all") == [tid]
    assert len(tok.special_tokens) == 256 and tok.vocab_size == 163840
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (163584, 163585, 163839)
    assert tok.encoding.n_vocab == 163840
    tok.check_model(load_config("kimi_k2"))


def test_special_text_is_plain_unless_allowed(small_tokenizer):
    plain = small_tokenizer.encode("<|im_end|>")
    assert small_tokenizer.im_end_id not in plain and len(plain) > 1
    assert small_tokenizer.encode("x<|im_end|>", allow_special={"<|im_end|>"})[-1] == small_tokenizer.im_end_id
    assert small_tokenizer.encode("hi", bos=True, eos=True)[::len(small_tokenizer.encode("hi")) + 1] == [
        small_tokenizer.bos_id, small_tokenizer.eos_id]


def _longest_run(piece: str) -> int:
    """The longest run of whitespace or of non-whitespace characters: what BPE must merge as one pre-token."""
    return max((len(m) for m in re.findall(r"\s+|\S+", piece)), default=0)


def test_long_inputs_are_encoded_in_bounded_pieces(small_tokenizer, monkeypatch):
    """BPE's cost grows with the square of a pre-token's length, so no piece handed to tiktoken may hold a run
    longer than MAX_RUN_CHARS or more than MAX_ENCODE_CHARS characters (a bound, not a wall-clock time: a loaded
    machine cannot make it fail). Positive control: without the run splitting, the check flags the input."""
    import k2jax.text.tokenizer as tk

    text = ("word " * 300_000) + ("x" * 600_000) + (" " * 100_000) + "end"
    pieces = []
    real = small_tokenizer.encoding.encode

    def recording(piece, **kw):
        pieces.append(piece)
        return real(piece, **kw)

    monkeypatch.setattr(small_tokenizer.encoding, "encode", recording)
    ids = small_tokenizer.encode(text)
    assert "".join(pieces) == text and small_tokenizer.decode(ids) == text
    assert max(len(p) for p in pieces) <= tk.MAX_ENCODE_CHARS
    assert max(_longest_run(p) for p in pieces) <= tk.MAX_RUN_CHARS
    pieces.clear()
    monkeypatch.setattr(tk, "MAX_RUN_CHARS", 10**9)  # the control: one run of 400k 'x' reaches BPE whole
    small_tokenizer.encode("x" * 100_000)
    assert max(_longest_run(p) for p in pieces) == 100_000


def test_bad_files_and_vocab(tmp_path, small_tokenizer):
    bad = tmp_path / "bad.model"
    bad.write_text(base64.b64encode(b"a").decode() + " 0\nnot-base64!! 1\n")
    with pytest.raises(TokenizerError, match=r"bad.model:2: malformed"):
        load_tokenizer(str(bad))
    gap = tmp_path / "gap.model"
    gap.write_text(base64.b64encode(b"a").decode() + " 0\n" + base64.b64encode(b"b").decode() + " 2\n")
    with pytest.raises(TokenizerError, match="rank 1 is missing"):
        load_tokenizer(str(gap))
    with pytest.raises(TokenizerError, match="vocab_size' is 1000"):
        small_tokenizer.check_model(load_config("tiny").replace(vocab_size=1000))
    small_tokenizer.check_model(load_config("tiny"))


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


def test_chat_template_with_tools():
    messages = [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "functions.get_weather:0", "type": "function",
             "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "functions.get_weather:0", "name": "get_weather", "content": "{\"c\": 21}"},
    ]
    expected = (
        '<|im_system|>tool_declare<|im_middle|>[{"type":"function","function":{"name":"get_weather",'
        '"description":"Weather of a city","parameters":{"type":"object","properties":{"city":{"type":"string"}}}}}]'
        "<|im_end|>"
        "<|im_system|>system<|im_middle|>You are helpful.<|im_end|>"
        "<|im_user|>user<|im_middle|>Weather in Paris?<|im_end|>"
        "<|im_assistant|>assistant<|im_middle|><|tool_calls_section_begin|><|tool_call_begin|>"
        'functions.get_weather:0<|tool_call_argument_begin|>{"city": "Paris"}<|tool_call_end|>'
        "<|tool_calls_section_end|><|im_end|>"
        '<|im_system|>get_weather<|im_middle|>## Return of functions.get_weather:0\n{"c": 21}<|im_end|>'
        "<|im_assistant|>assistant<|im_middle|>"
    )
    assert apply_chat_template(messages, tools=TOOLS) == expected


def test_default_system_turn_and_no_generation_prompt():
    out = apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=False)
    assert out == ("<|im_system|>system<|im_middle|>You are Kimi, an AI assistant created by Moonshot AI.<|im_end|>"
                   "<|im_user|>user<|im_middle|>hi<|im_end|>")


def test_chat_encodes_to_special_ids(small_tokenizer):
    ids = small_tokenizer.encode(apply_chat_template([{"role": "user", "content": "hi"}]), allow_special="all")
    assert ids[0] == small_tokenizer.special_tokens["<|im_system|>"]
    assert ids[-1] == small_tokenizer.special_tokens["<|im_middle|>"]


def test_parse_tool_calls():
    text = ("Let me check.<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0"
            '<|tool_call_argument_begin|>{"city": "Paris"}<|tool_call_end|><|tool_call_begin|> functions.get_time:1 '
            '<|tool_call_argument_begin|>{}<|tool_call_end|><|tool_calls_section_end|><|im_end|>')
    content, calls = parse_tool_calls(text)
    assert content == "Let me check."
    assert [c["function"]["name"] for c in calls] == ["get_weather", "get_time"]
    assert calls[0]["id"] == "functions.get_weather:0" and calls[0]["function"]["arguments"] == '{"city": "Paris"}'
    assert parse_tool_calls("plain answer<|im_end|>") == ("plain answer", [])
    # a dotted name keeps everything after `functions.`; an id not of the form functions.NAME:INDEX is plain text
    dotted = ("<|tool_calls_section_begin|><|tool_call_begin|>functions.db.query:3<|tool_call_argument_begin|>{}"
              "<|tool_call_end|><|tool_calls_section_end|>")
    assert parse_tool_calls(dotted)[1][0]["function"]["name"] == "db.query"
    bad = ("ok<|tool_calls_section_begin|><|tool_call_begin|>get_weather<|tool_call_argument_begin|>{}"
           "<|tool_call_end|><|tool_call_begin|>functions.x:y<|tool_call_argument_begin|>{}<|tool_call_end|>"
           "<|tool_calls_section_end|>")
    content, calls = parse_tool_calls(bad)
    assert calls == [] and content.startswith("ok") and "get_weather" in content and "functions.x:y" in content


CONVERSATIONS = [
    ([{"role": "user", "content": "hi", "name": "alice"}], None),
    ([{"role": "system", "content": "Be brief.", "name": "policy"},
      {"role": "user", "content": "Weather in Paris? «вопрос»", "name": "bob"},
      {"role": "assistant", "content": "Checking.", "name": "kimi", "tool_calls": [
          {"id": "functions.get_weather:0", "type": "function",
           "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}},
          {"id": "functions.get_weather:1", "type": "function",
           "function": {"name": "get_weather", "arguments": {"city": "Lyon", "note": "été"}}}]},
      {"role": "tool", "tool_call_id": "functions.get_weather:0", "name": "get_weather", "content": "{\"c\": 21}"},
      {"role": "tool", "tool_call_id": "functions.get_weather:1", "content": "{\"c\": 19}"},
      {"role": "assistant", "content": "21 and 19."}], TOOLS),
    ([{"role": "user", "content": "multi\nline"}, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "functions.x.y:0", "type": "function", "function": {"name": "x.y", "arguments": "{}"}}]}], TOOLS),
]


@pytest.mark.parametrize("i", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_builtin_renderer_and_its_jinja2_form_agree_byte_for_byte(i, generation_prompt):
    """The built-in renderer and tests/assets/k2_builtin.jinja, rendered through jinja2 with transformers'
    settings (k2jax.text.chat.ChatTemplate), give the same text for conversations with names, tools, tool calls
    and tool results; the template's turns (segments_from_text) carry the same generated-token marks."""
    from k2jax.text.chat import ChatTemplate, render_segments

    messages, tools = CONVERSATIONS[i]
    template = ChatTemplate(open(os.path.join(os.path.dirname(__file__), "assets", "k2_builtin.jinja")).read(),
                            "k2_builtin.jinja")
    builtin = apply_chat_template(messages, tools, generation_prompt)
    assert template.render(messages, tools, generation_prompt) == builtin
    assert template.segments(messages, tools, generation_prompt) == render_segments(messages, tools, generation_prompt)
    if any(m.get("name") for m in messages if m["role"] != "tool"):  # the name replaces the role in the header
        named = next(m for m in messages if m.get("name") and m["role"] != "tool")
        assert f"|>{named['name']}<|im_middle|>" in builtin


def test_the_template_shipped_with_a_checkpoint_is_found_and_bad_ones_are_named(tmp_path):
    """An HF folder's tokenizer_config.json chat_template (or chat_template.jinja, which wins) is used over the
    built-in renderer; --chat_template names a missing file or a template with a syntax error and its line."""
    from k2jax.errors import ChatFormatError
    from k2jax.text.chat import load_chat_template

    assert load_chat_template("", near=(str(tmp_path),)).source == "built-in"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages[0]['content'] }}!"}))
    found = load_chat_template("", near=(str(tmp_path),))
    assert found.render([{"role": "user", "content": "hi"}]) == "hi!" and "tokenizer_config.json" in found.source
    (tmp_path / "chat_template.jinja").write_text("[{{ messages | length }}]")
    assert load_chat_template("", near=(str(tmp_path),)).render([{"role": "user", "content": "x"}]) == "[1]"
    with pytest.raises(ChatFormatError, match="--chat_template=.*nope.jinja: file not found"):
        load_chat_template(str(tmp_path / "nope.jinja"))
    bad = tmp_path / "bad.jinja"
    bad.write_text("ok\n{% if %}")
    with pytest.raises(ChatFormatError, match="bad.jinja, line 2"):
        load_chat_template(str(bad))
