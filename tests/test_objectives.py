"""Objective losses and metrics against direct numpy computations; labelled records and the records store."""

import json

import jax
import numpy as np
import pytest

from glore_jax import errors, models, objectives, prompts
from glore_jax.data.labelled import SyntheticLabelled
from glore_jax.data.store import RecordsFile, write_records
from glore_jax.tasks import SyntheticConfig, first_wrong_step, generate_split, split_steps
from glore_jax.tokenizer import train_tokenizer


def _batch(rng, config, b=3, t=12):
    tokens = rng.integers(0, config.vocab_size, (b, t)).astype(np.int32)
    lengths = np.array([t, t - 3, t - 5])
    seg = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
    loss_mask = (seg * (np.arange(t)[None] >= 4)).astype(np.float32)
    step_end = np.zeros((b, t), np.float32)
    labels = np.full((b, t), -1.0, np.float32)
    step_end[0, [5, 8, 11]] = 1
    labels[0, [5, 8, 11]] = [1, 0, 0]
    step_end[1, [4, 6]] = 1
    labels[1, [4, 6]] = [1, -1]  # an ignored label: the last scorable position is 4
    # row 2: no step ends at all
    return {"tokens": tokens, "loss_mask": loss_mask, "step_end_mask": step_end, "step_labels": labels,
            "segment_ids": seg, "positions": np.where(seg > 0, np.arange(t)[None], 0).astype(np.int32)}


def test_sft_loss_is_mean_cross_entropy_over_targets():
    config = models.preset("tiny")
    params = models.init_params(config, jax.random.key(0))
    batch = _batch(np.random.default_rng(0), config)
    loss_sum, metrics = objectives.get("sft").loss_fn(params, batch, jax.random.key(1), config)
    logits = np.asarray(models.apply(config, params, batch["tokens"], batch["positions"], batch["segment_ids"]).logits)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    nll = -np.take_along_axis(logp[:, :-1], batch["tokens"][:, 1:, None], -1)[..., 0]
    mask = batch["loss_mask"][:, 1:]
    assert float(metrics["loss"][1]) == mask.sum()
    np.testing.assert_allclose(float(loss_sum), (nll * mask).sum(), rtol=1e-5)
    means = objectives.finalize(metrics)
    np.testing.assert_allclose(float(means["loss"]), (nll * mask).sum() / mask.sum(), rtol=1e-5)


def test_next_token_nll_and_hits_equal_optax_and_argmax_with_the_same_gradient():
    """The hand-written loss equals optax's cross entropy on logits[:, :-1], its gradient autodiff's."""
    import jax.numpy as jnp
    import optax
    from glore_jax.models import next_token_nll
    logits = jax.random.normal(jax.random.key(0), (3, 9, 17)) * 3
    tokens = jax.random.randint(jax.random.key(1), (3, 9), 0, 17)
    tokens = tokens.at[0, 4].set(jnp.argmax(logits[0, 3]))  # at least one top-1 hit
    mask = (jax.random.uniform(jax.random.key(2), (3, 8)) > 0.3).astype(jnp.float32)
    weights = jax.random.normal(jax.random.key(3), (3, 8))  # a loss that weights each position differently

    def ours(x):
        nll, _ = next_token_nll(x, tokens)
        return jnp.sum(nll[:, :-1] * mask * weights)

    def reference(x):
        return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(x[:, :-1], tokens[:, 1:]) * mask * weights)

    nll, hit = next_token_nll(logits, tokens)
    assert nll.shape == hit.shape == (3, 9) and bool(jnp.all(jnp.isfinite(nll)))
    np.testing.assert_allclose(np.asarray(nll[:, :-1]), np.asarray(
        optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:])), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(hit[:, :-1]), np.asarray(jnp.argmax(logits[:, :-1], -1) == tokens[:, 1:]))
    assert bool(hit[0, 3])
    np.testing.assert_allclose(np.asarray(jax.grad(ours)(logits)), np.asarray(jax.grad(reference)(logits)),
                               rtol=1e-5, atol=1e-6)


def test_value_loss_and_accuracies_read_only_labelled_step_ends():
    config = models.preset("tiny", heads=("value",))
    params = models.init_params(config, jax.random.key(0))
    batch = _batch(np.random.default_rng(1), config)
    _, metrics = objectives.get("sorm").loss_fn(params, batch, jax.random.key(1), config)
    v = np.asarray(models.apply(config, params, batch["tokens"], batch["positions"], batch["segment_ids"]).values)
    points = [(0, 5, 1), (0, 8, 0), (0, 11, 0), (1, 4, 1)]
    bce = [np.logaddexp(0, v[r, t]) - y * v[r, t] for r, t, y in points]
    hits = [int((v[r, t] > 0) == bool(y)) for r, t, y in points]
    means = {k: float(x) for k, x in objectives.finalize(metrics).items()}
    np.testing.assert_allclose(means["loss"], np.mean(bce), rtol=1e-5)
    assert means["step_accuracy"] == pytest.approx(np.mean(hits))
    assert float(metrics["final_accuracy"][1]) == 2  # row 2 has nothing to score
    assert means["final_accuracy"] == pytest.approx((hits[2] + hits[3]) / 2)


def test_registry_names_valid_choices():
    with pytest.raises(ValueError, match=r"'ppo'.*\['grpo', 'latro', 'orm', 'refinerl', 'score', 'sft', 'sorm'\]"):
        objectives.get("ppo")
    with pytest.raises(ValueError, match="valid formats"):
        objectives.get("orm").check_format("policy")
    assert objectives.get("sft").check_format("") == "policy"


def test_synthetic_labelled_records_are_exact_and_format_everywhere(tmp_path):
    task = list(generate_split(SyntheticConfig(train_size=40, test_size=4, seed=2), "train"))
    labelled = SyntheticLabelled(task, seed=4)
    rows = labelled[:]
    assert rows == labelled[:]  # deterministic
    assert 5 < sum(r["correct"] for r in rows) < 35
    for r, source in zip(rows, task):
        meta = json.loads(source["meta"])
        wrong = first_wrong_step(meta, r["solution"])
        n = len(r["step_labels"])
        expected = [1.0] * n if wrong is None else [1.0] * min(wrong, n) + [0.0] * (n - min(wrong, n))
        assert r["step_labels"] == expected and r["correct"] == (wrong is None)
        assert first_wrong_step(meta, r["draft"]) == r["bad_step"] <= len(split_steps(r["draft"]))
    tok = train_tokenizer((t for r in task for t in (r["question"], r["answer"])), 320)
    path = tmp_path / "labelled.jsonl"
    assert write_records(path, rows) == len(rows)
    stored = RecordsFile(path)
    assert stored[:] == rows
    for name, fmt in prompts.FORMATS.items():
        fmt.check(stored)
        example = prompts.Renderer(name, tok)(stored[0])
        assert example.loss_mask.sum() > 0 or fmt.head == "value"
        # The prompt a sampler gets is exactly the example's prompt part.
        assert fmt.prompt(tok, stored[0]) == example.tokens[:example.prompt_len].tolist()
    local = prompts.Renderer("local_refiner", tok)(stored[0])
    assert tok.bad_id in local.tokens[:local.prompt_len]
    sorm = prompts.Renderer("sorm", tok)(stored[0])
    assert list(sorm.step_labels[sorm.step_end_mask > 0]) == stored[0]["step_labels"]
    with pytest.raises(ValueError, match=r"lack fields \['step_labels'\]"):
        prompts.get("sorm").check([{"question": "q", "solution": "s"}])
    with pytest.raises(errors.DataError, match=r"needs fields \[.draft.\]"):
        prompts.Renderer("global_refiner", tok)({"question": "q", "target": "t"})
    with pytest.raises(ValueError, match="valid formats"):
        prompts.Renderer("no_such_format", tok)
