"""Printing generated text as it arrives (shared by k2jax-generate and k2jax-train's sample)."""

from __future__ import annotations


def stream_one(model, prompt_ids, sample) -> str:
    """Generates for one prompt, printing text as tokens arrive; returns the text without stop tokens."""
    tok = model.tokenizer
    state = {"ids": [], "shown": ""}
    stops = {model.config.eos_token_id, tok.im_end_id} - {None}

    def stream(step, tokens, done):
        t = int(tokens[0])
        if t in stops:
            return
        state["ids"].append(t)
        text = tok.decode(state["ids"])
        if not text.endswith("\ufffd"):
            print(text[len(state["shown"]):], end="", flush=True)
            state["shown"] = text

    model.generate([prompt_ids], stream=stream, **sample)
    return tok.decode(state["ids"])
