"""Chat SFT from released weights: assistant-only loss weights, packing, bad records, --init_from, learning."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import k2jax
from conftest import TINY_RUN
from k2jax.data.chat import ChatSource
from k2jax.data.pipeline import make_dataset
from k2jax.errors import DataError

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
CONVERSATION = {
    "tools": TOOLS,
    "messages": [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "What is the weather in Paris?", "name": "alice"},
        {"role": "assistant", "content": "Let me check.",
         "tool_calls": [{"id": "functions.get_weather:0", "type": "function",
                         "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "functions.get_weather:0", "name": "get_weather", "content": "18 C, sunny"},
        {"role": "assistant", "content": "It is 18 C and sunny in Paris."},
    ],
}


def _write(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


# CONVERSATION in K2's chat format, written out by hand from K2's published template: the pieces the loader must
# weight (True: what the assistant generates, its <|im_end|> included) and those it must not (False)
RENDERED = [
    (False, '<|im_system|>tool_declare<|im_middle|>[{"type":"function","function":{"name":"get_weather",'
            '"description":"Weather of a city","parameters":{"type":"object",'
            '"properties":{"city":{"type":"string"}}}}}]'
            '<|im_end|><|im_system|>system<|im_middle|>You are a terse assistant.<|im_end|>'
            '<|im_user|>alice<|im_middle|>What is the weather in Paris?<|im_end|><|im_assistant|>assistant<|im_middle|>'),
    (True, 'Let me check.<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0'
           '<|tool_call_argument_begin|>{"city": "Paris"}<|tool_call_end|><|tool_calls_section_end|><|im_end|>'),
    (False, '<|im_system|>get_weather<|im_middle|>## Return of functions.get_weather:0\n18 C, sunny<|im_end|>'
            '<|im_assistant|>assistant<|im_middle|>'),
    (True, 'It is 18 C and sunny in Paris.<|im_end|>'),
]


def _literal_tokens(tok):
    """(tokens, loss weights) of RENDERED: each piece encoded alone, weighted as written."""
    pieces = [tok.encode(text, allow_special="all") for _, text in RENDERED]
    tokens = np.concatenate(pieces).astype(np.int32)
    weights = np.concatenate([np.full(len(p), int(w), np.int32) for (w, _), p in zip(RENDERED, pieces)])
    # every piece's edge is a special token, so the pieces' tokens are the whole text's
    assert tokens.tolist() == tok.encode("".join(text for _, text in RENDERED), allow_special="all")
    return tokens, weights


def test_loss_weights_are_exactly_the_assistant_generated_tokens(small_tokenizer, tmp_path):
    path = _write(tmp_path / "one.jsonl", [CONVERSATION])
    item = ChatSource(path, small_tokenizer.path, 1024)[0]
    tokens, weights = _literal_tokens(small_tokenizer)
    np.testing.assert_array_equal(item["tokens"], tokens)
    np.testing.assert_array_equal(item["weights"], weights)


def test_packing_keeps_every_weight_on_its_token(small_tokenizer, tmp_path):
    records = []
    for i in range(12):
        r = json.loads(json.dumps(CONVERSATION))
        r["messages"][1]["content"] = f"Question number {i}: " + "and more " * (i % 4)
        r["messages"][-1]["content"] = f"Answer {i}" + "!" * i
        if i % 3 == 0:
            r = {"messages": r["messages"][:2] + [{"role": "assistant", "content": f"Short {i}."}]}
        records.append(r)
    source = ChatSource(_write(tmp_path / "many.jsonl", records), small_tokenizer.path, 256)
    # each conversation's own tokens and weights, before packing (their rendering is the test above's)
    wanted = {tuple(source[i]["tokens"].tolist()): source[i]["weights"] for i in range(len(source))}
    assert len(wanted) == len(records)
    ds = make_dataset(source, small_tokenizer.path, seq_len=256, batch_size=2, seed=0, num_epochs=1,
                      drop_remainder=False)
    seen = 0
    for b in ds:
        for row in range(len(b["tokens"])):
            for seg in set(b["segment_ids"][row].tolist()) - {0}:
                at = b["segment_ids"][row] == seg
                key = tuple(b["tokens"][row][at].tolist())
                assert key in wanted  # whole conversations, never split across rows
                np.testing.assert_array_equal(b["weights"][row][at], wanted[key])
                np.testing.assert_array_equal(b["positions"][row][at], np.arange(at.sum()))
                seen += 1
            assert not b["weights"][row][b["segment_ids"][row] == 0].any()  # padding carries no loss
    assert seen == len(records)


BAD = [
    ('{"messages": [{"role": "robot", "content": "x"}]}', "unknown role 'robot'"),
    ('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}, '
     '{"role": "tool", "content": "z"}]}', "tool result needs a string 'tool_call_id'"),
    ('{"messages": [{"role": "user", "content": ["x"]}, {"role": "assistant", "content": "y"}]}',
     "'content' must be a string, got list"),
    ('{"messages": [{"role": "user", "content": "x"}', "not valid JSON"),
]


@pytest.mark.parametrize("line, reason", BAD)
def test_malformed_records_name_file_and_line(small_tokenizer, tmp_path, line, reason):
    path = _write(tmp_path / "bad.jsonl", [CONVERSATION, CONVERSATION, line, CONVERSATION])
    with pytest.raises(DataError, match=f"{path}:3: .*{reason}"):
        ChatSource(path, small_tokenizer.path, 1024)
    skipping = ChatSource(path, small_tokenizer.path, 1024, on_bad="skip")
    assert len(skipping) == 3 and skipping.counts.skipped_bad == [3]


def test_long_conversations_are_dropped_or_truncated_at_a_turn_boundary(small_tokenizer, tmp_path):
    path = _write(tmp_path / "long.jsonl", [CONVERSATION])
    tokens, weights = _literal_tokens(small_tokenizer)
    first_answer_end = int(np.flatnonzero(weights)[0]) + int(np.argmin(weights[np.flatnonzero(weights)[0]:]))
    seq = first_answer_end + 5  # room for the turns up to the first answer, not for the rest
    short = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    dropped = ChatSource(_write(tmp_path / "l2.jsonl", [CONVERSATION, CONVERSATION, short]), small_tokenizer.path, seq)
    assert (len(dropped), dropped.counts.dropped_long) == (1, 2)
    cut = ChatSource(path, small_tokenizer.path, seq, on_long="truncate")
    assert cut.counts.truncated == 1 and len(cut) == 1
    item = cut[0]
    np.testing.assert_array_equal(item["tokens"], tokens[:first_answer_end])  # up to the end of the tool-call turn
    np.testing.assert_array_equal(item["weights"], weights[:first_answer_end])


def _cli(module, *args, stdin=None, devices=1):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
               K2JAX_HOST_MALLOC="0")
    return subprocess.run([sys.executable, "-m", f"k2jax.cli.{module}", *args], capture_output=True, text=True,
                          env=env, input=stdin, timeout=900)


def test_bad_chat_data_stops_the_cli_with_file_and_line(small_tokenizer, tmp_path):
    path = _write(tmp_path / "bad.jsonl", [CONVERSATION, BAD[0][0]])
    r = _cli("train", "--config=tiny", f"--workdir={tmp_path / 'w'}", f"--data={path}", "--data_format=chat",
             f"--tokenizer={small_tokenizer.path}", "--steps=1", "--sample_tokens=0")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert f"error: {path}:2: messages[0]: unknown role 'robot'" in r.stderr
    assert not os.path.exists(tmp_path / "w" / "1")
    r = _cli("train", f"--workdir={tmp_path / 'v'}", f"--data={path}", "--data_format=chat", f"--eval_data={path}")
    assert r.returncode == 2 and "--eval_data and --eval_every go together" in r.stderr, r.stderr
    assert not os.path.exists(tmp_path / "v")  # refused before anything is written


@pytest.fixture(scope="module")
def converted(hf_tiny, tmp_path_factory):
    """(HF folder, its k2jax-convert output in float32)."""
    from k2jax.ckpt.convert import import_hf

    out = tmp_path_factory.mktemp("converted")
    import_hf(hf_tiny[0], str(out), dtype="float32", quiet=True)
    return hf_tiny[0], str(out)


def _first_step(trainer, source, batch):
    from k2jax.train.resume import load_weights

    state = trainer.init_state(model_state=load_weights(source, trainer))
    with jax.set_mesh(trainer.mesh):
        loss, grads, _ = jax.jit(trainer._grads)(state.params, state.bias, batch)
    return float(loss), jax.tree.leaves(jax.device_get(grads))


def test_init_from_hf_and_from_its_conversion_start_identically(converted, hf_tiny, tiny_config, tmp_path):
    from k2jax.testing.reference import hf_logits, write_fp8_release
    from k2jax.train.optim import OptimConfig
    from k2jax.train.step import Trainer

    hf_dir, k2_dir = converted
    hf_tiny_model = hf_tiny[1]
    trainer = Trainer(tiny_config, OptimConfig(), k2jax.make_mesh("", devices=jax.devices()[:1]), execution=TINY_RUN)
    tokens = np.random.default_rng(0).integers(0, tiny_config.vocab_size, (2, 32)).astype(np.int32)
    batch = {"tokens": tokens, "segment_ids": np.ones_like(tokens), "positions": np.tile(np.arange(32), (2, 1))}
    loss_hf, grads_hf = _first_step(trainer, hf_dir, batch)
    loss_k2, grads_k2 = _first_step(trainer, k2_dir, batch)
    assert loss_hf == loss_k2 and np.isfinite(loss_hf)
    for a, b in zip(grads_hf, grads_k2):
        np.testing.assert_array_equal(a, b)  # bitwise, float32
    fp8 = tmp_path / "fp8"
    fp8.mkdir()
    dequant = write_fp8_release(hf_dir, str(fp8))
    from k2jax.ckpt.convert import import_hf

    fp8_k2 = import_hf(str(fp8), str(tmp_path / "fp8_k2"), dtype="float32", quiet=True)
    loss_fp8, grads_fp8 = _first_step(trainer, str(fp8), batch)
    loss_fp8_k2, grads_fp8_k2 = _first_step(trainer, fp8_k2, batch)
    assert loss_fp8 == loss_fp8_k2
    for a, b in zip(grads_fp8, grads_fp8_k2):
        np.testing.assert_array_equal(a, b)
    # the FP8 release starts the trainer from its dequantised weights: logits of transformers holding those
    # weights (the blocks dequantised by the plain NumPy loop of k2jax.testing.reference) within float32 rounding
    got = _start_logits(trainer, str(fp8), tokens)
    want = _dequantised_logits(hf_tiny_model, dequant, tokens)
    tol = 1e-4
    assert np.abs(got - want).max() <= tol, np.abs(got - want).max()
    # positive control: the comparison tells the FP8 weights from the float32 ones they were rounded from
    assert np.sqrt(np.mean((hf_logits(hf_tiny_model, tokens) - want) ** 2)) > 10 * tol


def _start_logits(trainer, source, tokens):
    """Logits of the model the trainer starts from when initialised from `source`."""
    from flax import nnx

    from k2jax.train.resume import load_weights

    state = trainer.init_state(model_state=load_weights(source, trainer))
    return np.asarray(nnx.merge(trainer.graphdef, state.params, state.bias)(tokens))


def _dequantised_logits(torch_model, dequant, tokens):
    """float32 logits of a copy of `torch_model` holding the {official name: array} weights `dequant`."""
    import copy

    import torch

    from k2jax.testing.reference import hf_logits, load_official_names

    model = copy.deepcopy(torch_model)
    load_official_names(model, {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in dequant.items()})
    return hf_logits(model, tokens)


def test_init_from_refuses_a_disagreeing_config_and_architecture_sets(converted, tmp_path):
    hf_dir, _ = converted
    r = _cli("train", "--config=small", f"--init_from={hf_dir}", f"--workdir={tmp_path / 'w'}", "--steps=1")
    assert r.returncode == 2 and "config field 'vocab_size': 32768 vs 4096" in r.stderr, r.stderr
    r = _cli("train", f"--init_from={hf_dir}", "--set=num_hidden_layers=2", f"--workdir={tmp_path / 'w'}", "--steps=1")
    assert r.returncode == 2 and "--set num_hidden_layers=...: an architecture field" in r.stderr, r.stderr
    assert not os.path.exists(tmp_path / "w")


PATTERN = "Certainly! The answer is 42."


def _pattern_conversations(n, seed):
    rng = np.random.default_rng(seed)
    words = ["weather", "python", "a list", "the sea", "music", "numbers", "a file", "tea", "trains", "code"]
    out = []
    for _ in range(n):
        q = f"Tell me about {rng.choice(words)} and {rng.choice(words)}, please."
        out.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": PATTERN}]})
    return out


def test_sft_from_converted_weights_learns_the_assistant_pattern(converted, small_tokenizer, tmp_path):
    """A tiny model converted from a random HF checkpoint, fine-tuned on conversations whose assistant always
    answers the same: the held-out assistant loss falls by a clear margin within 100 CPU steps, and greedy
    `k2jax-generate --chat` from the checkpoint then produces the answer."""
    _, k2_dir = converted
    train = _write(tmp_path / "train.jsonl", _pattern_conversations(200, 0))
    held = _write(tmp_path / "held.jsonl", _pattern_conversations(16, 1))
    work = tmp_path / "sft"
    r = _cli("train", f"--init_from={k2_dir}", "--data_format=chat", f"--data={train}", f"--eval_data={held}",
             "--eval_every=50", f"--tokenizer={small_tokenizer.path}", f"--workdir={work}", "--steps=100",
             "--batch=8", "--seq=128", "--set=dtype=float32", "--sample_tokens=0", "--warmup=10", "--lr=3e-3")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "initialised from" in r.stdout
    evals = [json.loads(line) for line in open(work / "metrics.jsonl") if "eval_loss" in line]
    assert [e["step"] for e in evals] == [0, 50, 100]
    before = _held_out_loss_at_start(k2_dir, held, small_tokenizer)  # computed apart from the run
    assert evals[0]["eval_loss"] == pytest.approx(before, rel=1e-4)
    assert evals[-1]["eval_loss"] < 0.3 * before and evals[-1]["eval_accuracy"] > 0.9, (before, evals)
    again = _cli("train", f"--init_from={k2_dir}", "--data_format=chat", f"--data={train}",
                 f"--tokenizer={small_tokenizer.path}", f"--workdir={work}", "--steps=101", "--batch=8", "--seq=128",
                 "--set=dtype=float32", "--sample_tokens=0", "--warmup=10", "--lr=3e-3")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stdout and "initialised from" not in again.stdout  # the workdir wins over DIR
    g = _cli("generate", f"--checkpoint_dir={work}", "--chat", "--temperature=0", "--max_new_tokens=32",
             f"--tokenizer={small_tokenizer.path}", stdin="Tell me about tea and code, please.\n\n")
    assert g.returncode == 0, g.stderr[-3000:]
    assert f"k2> {PATTERN}" in g.stdout, g.stdout


def _held_out_loss_at_start(k2_dir, held, tok):
    """The held-out assistant loss of the converted weights before any step, computed apart from the trainer: the
    conversations unpacked (right-padded) through Model.logits, a float64 cross-entropy on the tokens the assistant
    generates (each target weighted by its own loss weight)."""
    model = k2jax.load(k2_dir, dtype="float32")
    source = ChatSource(held, tok.path, 128)
    items = [source[i] for i in range(len(source))]
    tokens = np.zeros((len(items), 128), np.int32)
    for row, item in enumerate(items):
        tokens[row, :len(item["tokens"])] = item["tokens"]
    logits = np.asarray(model.logits(tokens), np.float64)  # causal: the padding after a row changes none of it
    ce, n = 0.0, 0
    for row, item in enumerate(items):
        t = len(item["tokens"])
        z = logits[row, : t - 1]
        logp = z - z.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        at = item["weights"][1:] != 0
        ce -= logp[np.arange(t - 1), item["tokens"][1:]][at].sum()
        n += int(at.sum())
    assert n > 10 * len(items)
    return ce / n


def test_generate_cli_chat_carries_the_first_reply_into_the_second_turn(converted, small_tokenizer):
    """`k2jax-generate --chat` over stdin, two turns, greedy: each reply is what Model.generate gives for the
    conversation so far rendered in K2's chat format (the first reply carried into the second prompt), cut at
    <|im_end|>; `--prompt_ids` prints Model.generate's ids; bad flags exit 2 naming the flag."""
    from k2jax.text.chat import apply_chat_template

    _, k2_dir = converted
    r = _cli("generate", f"--checkpoint_dir={k2_dir}", "--chat", "--temperature=0", "--max_new_tokens=12",
             f"--tokenizer={small_tokenizer.path}", stdin="Hello there\nAnd now?\n\n")
    assert r.returncode == 0, r.stderr[-3000:]
    # stdin is no terminal: each "you> " prompt is followed directly by "k2> " and the reply, then a newline
    replies = [part[: part.rindex("\nyou> ")] for part in r.stdout.split("k2> ")[1:]]
    assert len(replies) == 2, r.stdout
    model = k2jax.load(k2_dir).attach_tokenizer(small_tokenizer.path)
    tok, messages = model.tokenizer, []
    for user, reply in zip(("Hello there", "And now?"), replies):
        messages.append({"role": "user", "content": user})
        ids = model.generate([tok.encode(apply_chat_template(messages), allow_special="all")], max_new_tokens=12)[0]
        assert tok.im_end_id not in ids[:-1] and "<|im_end|>" not in reply
        assert tok.decode([i for i in ids if i != tok.im_end_id]) == reply
        messages.append({"role": "assistant", "content": reply})
    ids = "5,9,200;17,4"
    r = _cli("generate", f"--checkpoint_dir={k2_dir}", f"--prompt_ids={ids}", "--temperature=0", "--max_new_tokens=6")
    assert r.returncode == 0, r.stderr[-3000:]
    want = model.generate([[5, 9, 200], [17, 4]], max_new_tokens=6, stop=[model.config.eos_token_id])
    assert r.stdout.strip().splitlines()[-2:] == [",".join(map(str, o)) for o in want]
    for bad, message in ((("--prompt_ids=1,x",), "--prompt_ids='1,x': expected comma-separated integers"),
                         (("--prompt=a", "--chat"), "give exactly one of --prompt, --chat, --prompt_ids"),
                         (("--prompt=a", "--temperature=hot"), "--temperature")):
        r = _cli("generate", f"--checkpoint_dir={k2_dir}", *bad)
        assert r.returncode == 2 and message in r.stderr, (bad, r.returncode, r.stderr[-1500:])


def test_chat_data_renders_with_the_checkpoints_template(small_tokenizer, tmp_path):
    """A ChatSource given a jinja2 template: the built-in renderer's jinja2 form gives the same tokens and loss
    weights as the built-in renderer; a template that differs (tool results headed otherwise) changes the tokens
    and keeps the weights on the assistant's generated text only."""
    from k2jax.text.chat import ChatTemplate

    path = _write(tmp_path / "c.jsonl", [CONVERSATION])
    asset = open(os.path.join(os.path.dirname(__file__), "assets", "k2_builtin.jinja")).read()
    builtin = ChatSource(path, small_tokenizer.path, 512)[0]
    same = ChatSource(path, small_tokenizer.path, 512, chat_template=ChatTemplate(asset, "asset"))[0]
    for k in ("tokens", "weights"):
        np.testing.assert_array_equal(same[k], builtin[k])
    other = ChatTemplate(asset.replace("## Return of", "### Result of call"), "other")
    changed = ChatSource(path, small_tokenizer.path, 512, chat_template=other)[0]
    assert len(changed["tokens"]) != len(builtin["tokens"])
    trained = small_tokenizer.decode(changed["tokens"][changed["weights"] > 0].tolist())
    assert trained == small_tokenizer.decode(builtin["tokens"][builtin["weights"] > 0].tolist())
