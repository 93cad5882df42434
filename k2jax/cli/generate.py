"""k2jax-generate: sample from a k2jax checkpoint (trained or converted) on a decode mesh of your choice."""

from __future__ import annotations

import sys

from absl import flags

from k2jax.cli.common import run_main
from k2jax.cli.stream import stream_one
from k2jax.inference.sampler import PREFILL_CHUNK
from k2jax.model.cache import CACHE_DTYPES

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint_dir", None, "A k2jax checkpoint: a step directory or a directory of steps.")
flags.DEFINE_string("tokenizer", "", "tiktoken.model (needed for --prompt/--chat; default: the embedded-corpus BPE).")
flags.DEFINE_string("prompt", None, "Text prompt.")
flags.DEFINE_bool("chat", False, "Interactive chat in K2's chat format.")
flags.DEFINE_string("prompt_ids", None, "Token-id prompts: 1,2,3;4,5 (prints the new ids of each, one line each).")
flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate per prompt.")
flags.DEFINE_float("temperature", 0.6, "Sampling temperature (0 = greedy).")
flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass.")
flags.DEFINE_integer("top_k", 0, "Top-k sampling (0 = off).")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_string("mesh", "", "Decode mesh spec, e.g. expert=4,tensor=2 (default: all devices on data).")
flags.DEFINE_enum("cache_dtype", "float32", list(CACHE_DTYPES), "KV-latent cache dtype.")
flags.DEFINE_integer("prefill_chunk", PREFILL_CHUNK, "Write longer prompts into the cache this many tokens at a "
                     "time, which bounds prefill memory by the chunk (0: every prompt at once).", lower_bound=0)
flags.DEFINE_bool("merge", False, "A LoRA run's checkpoint: fold the adapters into the base weights at load (decode "
                  "then costs what the base costs); default: applied unmerged.")
flags.DEFINE_string("base", "", "A LoRA run's base, when it has moved from the path recorded in its checkpoints (it "
                    "must hash the same).")
flags.DEFINE_string("chat_template", "", "--chat: a jinja2 chat template file (default: the one in the tokenizer's "
                    "folder, chat_template.jinja or tokenizer_config.json, else k2jax's built-in K2 renderer).")
flags.DEFINE_bool("heal", True, "--prompt: token healing (a prompt that ends mid-token, e.g. on a space, is continued "
                  "as the whole text would be: its last token taken back and the first new one drawn from those that "
                  "start with its text).")
flags.DEFINE_string("system", None, "System prompt for --chat (default: K2's).")
flags.mark_flag_as_required("checkpoint_dir")


def _parse_ids(text: str) -> list[list[int]]:
    try:
        return [[int(t) for t in part.split(",") if t.strip()] for part in text.split(";") if part.strip()]
    except ValueError:
        raise flags.ValidationError(f"--prompt_ids={text!r}: expected comma-separated integers, ';' between prompts") from None


def main(argv):
    del argv
    import jax

    import k2jax

    modes = sum(x is not None and x is not False for x in (FLAGS.prompt, FLAGS.prompt_ids, FLAGS.chat or None))
    if modes != 1:
        raise flags.ValidationError("give exactly one of --prompt, --chat, --prompt_ids")
    ids = _parse_ids(FLAGS.prompt_ids) if FLAGS.prompt_ids is not None else None
    from k2jax import storage

    storage.check_reachable(FLAGS.checkpoint_dir, "--checkpoint_dir")
    model = k2jax.load(FLAGS.checkpoint_dir, mesh=k2jax.make_mesh(FLAGS.mesh), merge=FLAGS.merge, base=FLAGS.base)
    sample = dict(max_new_tokens=FLAGS.max_new_tokens, temperature=FLAGS.temperature, top_p=FLAGS.top_p,
                  top_k=FLAGS.top_k, seed=FLAGS.seed, cache_dtype=FLAGS.cache_dtype,
                  prefill_chunk=FLAGS.prefill_chunk)
    if ids is not None:
        for out in model.generate(ids, **sample):
            print(",".join(map(str, out)))
        return 0
    from k2jax.data.corpus import default_tokenizer

    model.attach_tokenizer(FLAGS.tokenizer or default_tokenizer())
    tok = model.tokenizer
    if FLAGS.prompt is not None:
        print(FLAGS.prompt, end="", flush=True)
        stream_one(model, tok.encode(FLAGS.prompt, allow_special="all"), sample, heal=FLAGS.heal)
        print()
        return 0
    import os

    from k2jax.text.chat import load_chat_template

    template = load_chat_template(FLAGS.chat_template, near=(os.path.dirname(tok.path),))
    messages = [{"role": "system", "content": FLAGS.system}] if FLAGS.system else []
    print(f"chat with {FLAGS.checkpoint_dir} on {jax.device_count()} {jax.default_backend()} device(s), chat "
          f"template {template.source}; empty line or Ctrl-D to quit")
    while True:
        try:
            line = input("you> ")
        except EOFError:
            break
        if not line.strip():
            break
        messages.append({"role": "user", "content": line})
        print("k2> ", end="", flush=True)
        reply = stream_one(model, tok.encode(template.render(messages), allow_special="all"), sample)
        print()
        messages.append({"role": "assistant", "content": reply})
    return 0


def run():
    run_main(main, host_malloc=True)


if __name__ == "__main__":
    sys.exit(run())
