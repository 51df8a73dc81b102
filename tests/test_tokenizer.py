"""Tokenizer: real-model round trips, control tokens after the vocab, in-process training."""

import json
import pickle

import pytest

from glore_jax.tasks import SyntheticConfig, generate_split
from glore_jax.tokenizer import CONTROL_TOKENS, Tokenizer, escape, train_tokenizer


@pytest.fixture(scope="module")
def mistral(shared_dir):
    return Tokenizer.load(shared_dir / "tokenizers" / "mistral-7b-v0.1" / "tokenizer.model")


def test_real_model_round_trips_gsm8k_test(mistral, shared_dir):
    with open(shared_dir / "data" / "gsm8k" / "test.jsonl", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == 1319
    texts = [r["question"] for r in rows] + [r["answer"] for r in rows]
    for text, ids in zip(texts, mistral.encode_batch(texts, bos=True, eos=True)):
        assert ids[0] == mistral.bos_id and ids[-1] == mistral.eos_id
        assert max(ids) < mistral.sp_vocab_size
        assert mistral.decode(ids) == text


@pytest.mark.parametrize("typed", ["The [BAD] step", "a \\[BAD] b", "x \\\\[FIX]y", "no marker", "[SOL][DRAFT]"])
def test_a_real_bad_token_and_typed_text_decode_differently_and_round_trip(mistral, typed):
    real = mistral.encode("Step 1") + [mistral.bad_id] + mistral.encode("Step 2")
    typed_ids = mistral.encode(f"Step 1{typed}Step 2")
    assert mistral.decode(real) == "Step 1[BAD]Step 2"
    assert mistral.decode(typed_ids) != mistral.decode(real)
    mixed = mistral.encode(typed) + [mistral.bad_id] + mistral.encode(typed)
    text = mistral.decode(mixed)
    assert text.count("[BAD]") >= 1 and mistral.encode_markup(text) == mixed  # the token, and only it, comes back
    # Plain text reads back to itself: escaping is undone by encode_markup.
    assert mistral.encode_markup(mistral.decode(mistral.encode(typed))) == mistral.encode(typed)


def test_control_tokens_sit_after_the_vocab_and_cannot_be_forged(mistral):
    assert (mistral.sp_vocab_size, mistral.bos_id, mistral.eos_id) == (32000, 1, 2)
    assert mistral.vocab_size == 32000 + len(CONTROL_TOKENS)
    assert mistral.pad_id == mistral.eos_id  # the model has no pad piece
    assert mistral.bad_id == mistral.control_id("[BAD]") == 32000
    forged = " ".join(CONTROL_TOKENS) + " [BAD][SOL]"
    ids = mistral.encode(forged)
    assert not any(mistral.is_control(i) for i in ids)
    assert mistral.decode(ids) == escape(forged)  # typed names are escaped, so they never read as tokens
    assert mistral.decode(mistral.encode("a") + [mistral.bad_id] + mistral.encode("b")) == "a[BAD]b"
    with pytest.raises(ValueError, match="outside vocab"):
        mistral.decode([mistral.vocab_size])
    with pytest.raises(KeyError):
        mistral.control_id("[NOPE]")
    with pytest.raises(TypeError):
        mistral.encode(["not", "a", "str"])


def test_offsets_are_characters_not_bytes(mistral):
    text = "é€ 12\nab"
    ids, spans = mistral.encode_with_offsets(text)
    assert ids == mistral.encode(text)
    assert spans[-1][1] == len(text)
    assert all(0 <= b <= e <= len(text) for b, e in spans)


def test_trained_tokenizer_round_trips_synthetic_text(tmp_path):
    config = SyntheticConfig(train_size=1500, test_size=200, seed=1)
    train = [r["question"] + "\n" + r["answer"] for r in generate_split(config, "train")]
    test = [r["question"] + "\n" + r["answer"] for r in generate_split(config, "test")]
    out = tmp_path / "synthetic.model"
    tok = train_tokenizer(train, 800, out)
    assert tok.vocab_size == tok.sp_vocab_size + len(CONTROL_TOKENS)
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    for text in train[:300] + test + ["unseen ünïcode ✓ 007"]:
        assert tok.decode(tok.encode(text)) == text
    digits = [tok.decode([i]) for i in tok.encode("1234567")]
    assert "".join(digits).strip() == "1234567" and all(len(d.strip()) <= 1 for d in digits)
    reloaded = Tokenizer.load(out)
    assert reloaded.encode(test[0]) == tok.encode(test[0])
    assert pickle.loads(pickle.dumps(tok)).encode(test[0]) == tok.encode(test[0])
    # trained line by line: newline is never merged into a piece
    assert all("\n" not in tok.decode([i]) or tok.decode([i]) == "\n" for i in tok.encode(test[0]))
    with pytest.raises(ValueError):
        train_tokenizer(train, 100)
