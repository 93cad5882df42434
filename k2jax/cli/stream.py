"""Printing generated text as it arrives (shared by k2jax-generate and k2jax-train's sample)."""

from __future__ import annotations


def stream_one(model, prompt_ids, sample, heal: bool = False) -> str:
    """Generates for one prompt, printing text as tokens arrive; returns the text without stop tokens.

    `heal`: token healing (Tokenizer.heal) for a prompt the user typed; the text printed continues the prompt."""
    tok = model.tokenizer
    state = {"ids": [], "shown": ""}
    stops = {model.config.eos_token_id, tok.im_end_id} - {None}
    prompt_ids, allowed, removed = tok.heal(prompt_ids) if heal else (prompt_ids, None, b"")

    def text_of(ids):
        return tok.decode_bytes(ids)[len(removed):].decode("utf-8", errors="replace")

    def stream(step, tokens, done):
        t = int(tokens[0])
        if t in stops:
            return
        state["ids"].append(t)
        text = text_of(state["ids"])
        if not text.endswith("\ufffd"):
            print(text[len(state["shown"]):], end="", flush=True)
            state["shown"] = text

    model.generate([prompt_ids], stream=stream, first_allowed=[allowed], **sample)
    return text_of(state["ids"])
