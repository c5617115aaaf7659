"""Incremental detokenization: the backend's decode gives the wrapper's text, token by token."""

from __future__ import annotations

import numpy as np
import pytest

from jaxmm.engine.detokenizer import backend_decode, detokenize_incrementally, new_state
from tests.helpers import make_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("detok"))
    t = make_tokenizer(path)
    t.add_special_tokens({"additional_special_tokens": ["<|x|>"]})
    return t


def test_the_backend_path_is_taken_and_decodes_alike(tok):
    fast = backend_decode(tok)
    assert fast is backend_decode(tok)  # cached per tokenizer
    assert getattr(fast, "__self__", None) is not tok  # not the wrapper's bound method
    rs = np.random.RandomState(0)
    for _ in range(50):
        ids = rs.randint(0, len(tok), rs.randint(1, 30)).tolist()
        for skip in (False, True):
            assert fast(ids, skip_special_tokens=skip) == tok.decode(ids, skip_special_tokens=skip)


def test_a_tokenizer_that_cleans_up_spaces_keeps_the_wrapper(tok):
    import copy

    other = copy.deepcopy(tok)
    other.clean_up_tokenization_spaces = True
    assert getattr(backend_decode(other), "__self__", None) is other


def test_incremental_text_is_the_whole_decode(tok):
    text = "Hello world, the quick brown fox jumps over the lazy dog: 12345 <|x|> end."
    ids = tok(text, add_special_tokens=False).input_ids
    prompt = ids[:5]
    for skip in (False, True):
        st = new_state(len(prompt))
        pieces = "".join(
            detokenize_incrementally(tok, ids, st, skip, end) for end in range(6, len(ids) + 1)
        )
        assert pieces == st.text
        whole = tok.decode(ids, skip_special_tokens=skip)
        assert whole == tok.decode(prompt, skip_special_tokens=skip) + st.text
