"""Token healing: a prompt that ends mid-token (on a space, half a word) is continued as its whole text would be:
the prefix index against a scan of the vocabulary, the healed first token against NumPy over the model's logits,
and the mask a no-op where no longer token starts with the prompt's last one."""

import numpy as np
import pytest

import k2jax


@pytest.fixture(scope="module")
def model(tiny_config, small_tokenizer):
    import jax

    return k2jax.random_model(tiny_config, k2jax.make_mesh("", devices=jax.devices()[:1]), seed=1).attach_tokenizer(
        small_tokenizer)


def test_the_prefix_index_finds_exactly_the_tokens_a_scan_finds(small_tokenizer):
    tok = small_tokenizer
    every = [tok.encoding.decode_single_token_bytes(i) for i in range(tok.num_base)]
    for prefix in (b" ", b" d", b"de", b"def", b"1", b"\n", b"zzzz"):
        want = sorted(i for i, b in enumerate(every) if b.startswith(prefix))
        assert sorted(tok.tokens_starting_with(prefix).tolist()) == want, prefix
    assert len(tok.tokens_starting_with(b" ")) > 100 and len(tok.tokens_starting_with(b"zzzz")) == 0


def _log_softmax(z):
    z = np.asarray(z, np.float64)
    z = z - z.max()
    return z - np.log(np.exp(z).sum())


def test_a_prompt_ending_in_a_space_is_continued_as_the_whole_text(model):
    """'def ' ends on a lone ' ' token: healed, the first new token is the most likely of those that start with
    ' ' after 'def' (NumPy over Model.logits), and the rest is the greedy continuation of 'def' + that token; the
    text returned continues after 'def '."""
    tok = model.tokenizer
    ids = tok.encode("def ")
    assert tok.decode([ids[-1]]) == " " and len(ids) >= 2
    kept, allowed, removed = tok.heal(ids)
    assert kept == ids[:-1] and removed == b" " and ids[-1] in allowed.tolist()
    logp = _log_softmax(np.asarray(model.logits(np.asarray([kept])))[0, -1])
    first = int(allowed[np.argmax(logp[allowed])])
    rest = model.generate([kept + [first]], max_new_tokens=7, stop=[])[0]
    want = (tok.decode_bytes([first] + rest)[1:]).decode("utf-8", errors="replace")
    got = model.generate(["def "], max_new_tokens=8, stop=[])[0]
    assert got == want
    # positive control: without healing, the lone ' ' token stays and the model continues after it
    unhealed = model.generate([ids], max_new_tokens=8, stop=[])[0]
    assert model.generate(["def "], max_new_tokens=8, stop=[], heal=False)[0] == tok.decode(unhealed)
    assert tok.decode(unhealed) != got


def test_the_mask_is_a_no_op_where_no_longer_token_starts_with_the_last(model):
    """A prompt whose last token no longer token extends (nor a special one, nor a token-id prompt): healing
    changes nothing, the same greedy text either way."""
    tok = model.tokenizer
    def unextended(i):
        return len(tok.tokens_starting_with(tok.encoding.decode_single_token_bytes(i))) == 1

    lone = next(i for i in range(tok.num_base) if unextended(i) and tok.encode("x = " + tok.decode([i]))[-1] == i)
    text = "x = " + tok.decode([lone])
    assert tok.heal(tok.encode(text))[1] is None
    assert model.generate([text], max_new_tokens=6, stop=[]) == model.generate([text], max_new_tokens=6, stop=[],
                                                                               heal=False)
    assert tok.heal(tok.encode("hi<|im_end|>", allow_special="all"))[1] is None  # a special last token
