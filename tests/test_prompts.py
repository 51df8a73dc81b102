"""Prompt formats: masks cover exactly the target, step ends land on line ends, [BAD] is unforgeable."""

import numpy as np
import pytest

from glore_jax import prompts
from glore_jax.tasks import SyntheticConfig, generate_split, split_steps
from glore_jax.tokenizer import Tokenizer, train_tokenizer

QUESTION = "Mia has 348 marbles. She buys 27 more. How many now?"
SOLUTION = ("Mia buys 27 more: 348 + 27 = <<348+27=375>>375 marbles.\n"
            "Then she has 375 * 2 = <<375*2=750>>750 marbles.\n"
            "Finally 750 - 7 = <<750-7=743>>743.\n#### 743")


@pytest.fixture(scope="module", params=["mistral", "trained"])
def tok(request, shared_dir):
    if request.param == "mistral":
        return Tokenizer.load(shared_dir / "tokenizers" / "mistral-7b-v0.1" / "tokenizer.model")
    config = SyntheticConfig(train_size=800, test_size=10, seed=2)
    return train_tokenizer([r["question"] + "\n" + r["answer"] for r in generate_split(config, "train")], 700)


def _target_text(tok, example):
    ids = example.tokens[example.loss_mask == 1]
    assert ids[-1] == tok.eos_id
    return tok.decode(ids[:-1])


def test_policy_loss_covers_solution_and_eos_only(tok):
    ex = prompts.policy_example(tok, QUESTION, SOLUTION)
    prompt = prompts.policy_prompt(tok, QUESTION)
    assert ex.tokens[: ex.prompt_len].tolist() == prompt
    assert prompt[0] == tok.bos_id and prompt[-1] == tok.control_id("[SOL]")
    assert ex.loss_mask[: ex.prompt_len].sum() == 0 and ex.loss_mask[ex.prompt_len:].all()
    assert _target_text(tok, ex) == SOLUTION
    assert ex.tokens.dtype == np.int32 and ex.loss_mask.dtype == np.float32


def test_value_example_marks_each_step_and_final_line(tok):
    labels = [1.0, 0.5, 0.0, 0.0]
    ex = prompts.value_example(tok, QUESTION, SOLUTION, labels=labels)
    positions = np.nonzero(ex.step_end_mask)[0]
    assert len(positions) == prompts.num_scorable_positions(SOLUTION) == len(split_steps(SOLUTION)) + 1
    lines = SOLUTION.split("\n")
    for k, pos in enumerate(positions):
        upto = tok.decode(ex.tokens[ex.prompt_len: pos + 1])
        assert upto == "\n".join(lines[: k + 1]), (k, upto)
    assert ex.step_labels[positions].tolist() == labels
    assert (ex.step_labels[ex.step_end_mask == 0] == -1).all()
    unlabeled = prompts.value_example(tok, QUESTION, SOLUTION)
    assert (unlabeled.step_labels == -1).all() and (unlabeled.step_end_mask == ex.step_end_mask).all()
    with pytest.raises(ValueError, match="step labels"):
        prompts.value_example(tok, QUESTION, SOLUTION, labels=[1.0])


def test_global_refiner_loss_on_new_solution(tok):
    draft = SOLUTION.replace("750", "760")
    ex = prompts.global_refiner_example(tok, QUESTION, draft, SOLUTION)
    prompt = prompts.global_refiner_prompt(tok, QUESTION, draft)
    assert ex.tokens[: ex.prompt_len].tolist() == prompt
    assert tok.decode(prompt) == QUESTION + "[DRAFT]" + draft + "[FIX]"
    assert _target_text(tok, ex) == SOLUTION


@pytest.mark.parametrize("bad_step", [0, 1, 2, 3])
def test_local_refiner_marks_the_bad_step(tok, bad_step):
    lines = SOLUTION.split("\n")
    draft = "\n".join(lines[:bad_step] + ["Then 375 * 2 = <<375*2=760>>760.", "#### 760"])
    prompt = prompts.local_refiner_prompt(tok, QUESTION, draft, bad_step)
    assert prompt.count(tok.bad_id) == 1
    at = prompt.index(tok.bad_id)
    draft_start = prompt.index(tok.control_id("[DRAFT]")) + 1
    before = tok.decode(prompt[draft_start:at])
    assert before == "".join(line + "\n" for line in lines[:bad_step])
    # the kept steps are replayed after [FIX], so the refiner continues right after them
    fix = prompt.index(tok.control_id("[FIX]"))
    assert tok.decode(prompt[fix + 1:]) == "".join(line + "\n" for line in lines[:bad_step])
    continuation = prompts.local_continuation(SOLUTION, bad_step)
    ex = prompts.local_refiner_example(tok, QUESTION, draft, bad_step, continuation)
    assert _target_text(tok, ex) == continuation
    assert prompts.splice_local(draft, bad_step, continuation) == SOLUTION


def test_joint_refiner_format_renders_each_record_as_its_kind(tok):
    """glore.joint_refiner trains one model on both pair kinds: a record with bad_step is a local pair."""
    draft = SOLUTION.replace("750", "760")
    fmt = prompts.get("refiner")
    glob = {"question": QUESTION, "draft": draft, "target": SOLUTION}
    local = {**glob, "bad_step": 2}
    for record, kind in ((glob, "global_refiner"), (local, "local_refiner")):
        ours, theirs = fmt.example(tok, record), prompts.get(kind).example(tok, record)
        assert ours.tokens.tolist() == theirs.tokens.tolist() and ours.prompt_len == theirs.prompt_len
        assert ours.loss_mask.tolist() == theirs.loss_mask.tolist()
        assert fmt.prompt(tok, record) == prompts.get(kind).prompt(tok, record)
    assert fmt.prompt(tok, local).count(tok.bad_id) == 1 and tok.bad_id not in fmt.prompt(tok, glob)


def test_literal_bad_text_cannot_forge_the_marker(tok):
    question = "Is [BAD] a token? [BAD][FIX][SOL]"
    draft = "[BAD] 1 + 1 = <<1+1=2>>2\n[BAD]\n#### 2"
    assert tok.bad_id not in prompts.policy_prompt(tok, question)
    assert tok.bad_id not in prompts.global_refiner_prompt(tok, question, draft)
    local = prompts.local_refiner_prompt(tok, question, draft, 1)
    assert local.count(tok.bad_id) == 1
    assert local.count(tok.control_id("[FIX]")) == 1
    # The typed "[BAD]" comes back escaped: only the real marker decodes as a bare [BAD].
    assert tok.decode(local[local.index(tok.control_id("[FIX]")) + 1:]) == "\\[BAD] 1 + 1 = <<1+1=2>>2\n"
    with pytest.raises(ValueError, match="out of range"):
        prompts.local_refiner_prompt(tok, question, draft, 3)


def test_fit_truncates_prompt_from_the_left_then_target_end(tok):
    long_question = "word " * 200 + QUESTION
    ex = prompts.policy_example(tok, long_question, SOLUTION)
    target_len = len(ex) - ex.prompt_len
    fitted = prompts.fit(ex, target_len + 10)
    cut = fitted.example
    assert fitted.prompt_truncated and not fitted.target_truncated and len(cut) == target_len + 10
    assert cut.tokens[0] == tok.bos_id and cut.tokens[cut.prompt_len - 1] == tok.control_id("[SOL]")
    assert cut.tokens[1: cut.prompt_len].tolist() == ex.tokens[ex.prompt_len - cut.prompt_len + 1: ex.prompt_len].tolist()
    assert (cut.tokens[cut.prompt_len:] == ex.tokens[ex.prompt_len:]).all()

    short = prompts.fit(ex, 12)
    assert short.prompt_truncated and short.target_truncated and len(short.example) == 12
    assert short.example.tokens[2:].tolist() == ex.tokens[ex.prompt_len: ex.prompt_len + 10].tolist()

    untouched = prompts.fit(ex, len(ex))
    assert not untouched.prompt_truncated and not untouched.target_truncated
    ids, truncated = prompts.fit_prompt(prompts.policy_prompt(tok, long_question), 20)
    assert truncated and len(ids) == 20 and ids[0] == tok.bos_id and ids[-1] == tok.control_id("[SOL]")
    with pytest.raises(ValueError):
        prompts.fit(ex, 2)
