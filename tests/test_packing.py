"""Sequence packing: documents never see each other, per-document losses equal unpacked ones, resume is exact."""

import functools

import jax
import numpy as np
import optax
import pytest

from glore_jax import data, models, prompts, trainer
from glore_jax.data.packing import Packer
from glore_jax.sharding import make_mesh
from glore_jax.tasks import SyntheticConfig, generate_split
from glore_jax.tokenizer import train_tokenizer

TASK = SyntheticConfig(train_size=40, test_size=4, min_steps=1, max_steps=3, seed=9)


@pytest.fixture(scope="module")
def setup():
    records = list(generate_split(TASK, "train"))
    tok = train_tokenizer((t for r in records for t in (r["question"], r["answer"])), 512)
    return records, tok


class _List:
    """A list as a resumable stream (what Packer reads from Grain)."""

    def __init__(self, items):
        self.items, self.i = items, 0

    def __next__(self):
        self.i += 1
        return self.items[(self.i - 1) % len(self.items)]

    def get_state(self):
        return self.i

    def set_state(self, i):
        self.i = i


def _docs(tok, records):
    out = []
    for r in records:
        ex = prompts.get("sorm").example(tok, {**r, "solution": r["answer"],
                                               "step_labels": [1.0] * prompts.num_scorable_positions(r["answer"])})
        out.append({k: getattr(ex, k) for k in ("tokens", "loss_mask", "step_end_mask", "step_labels")})
    return out


@functools.partial(jax.jit, static_argnums=0)
def _per_token_jit(cfg, params, tokens, positions, segment_ids):
    out = models.apply(cfg, params, tokens, positions, segment_ids)
    return optax.softmax_cross_entropy_with_integer_labels(out.logits[:, :-1], tokens[:, 1:]), out.values


def _per_token(cfg, params, batch):
    # jit (one compile per length): eager dispatch of the model's small ops was most of this test's time.
    nll, values = _per_token_jit(cfg, params, batch["tokens"], batch["positions"], batch["segment_ids"])
    return np.asarray(nll), np.asarray(values)


def test_packed_documents_get_exactly_their_unpacked_losses_and_values(setup):
    records, tok = setup
    docs = _docs(tok, records[:12])
    packed, rows = Packer(_List(docs), rows=3, max_len=256, pad_id=tok.pad_id).next()
    placed = [d for row in rows for d in row]
    assert sum(len(r) >= 2 for r in rows) >= 2, "the test needs rows holding several documents"
    assert set(np.unique(packed["segment_ids"])) >= {0, 1, 2}
    cfg = models.preset("tiny", heads=("lm", "value"), vocab_size=640)
    params = models.init_params(cfg, jax.random.key(0))
    nll_p, val_p = _per_token(cfg, params, packed)
    for i, row in enumerate(rows):
        start = 0
        for seg, doc in enumerate(row, start=1):
            n = len(doc["tokens"])
            alone = {"tokens": doc["tokens"][None], "positions": np.arange(n)[None], "segment_ids": np.ones((1, n), np.int32)}
            nll_a, val_a = _per_token(cfg, params, alone)
            mask = doc["loss_mask"][1:]
            # The document's summed target loss and its values at step ends: identical alone and packed.
            np.testing.assert_allclose((nll_p[i, start:start + n - 1] * mask).sum(), (nll_a[0] * mask).sum(), rtol=1e-5)
            ends = doc["step_end_mask"] > 0
            np.testing.assert_allclose(val_p[i, start:start + n][ends], val_a[0][ends], atol=1e-5)
            assert (packed["segment_ids"][i, start:start + n] == seg).all()
            assert (packed["positions"][i, start:start + n] == np.arange(n)).all()
            start += n
    # Attention really is masked: without segment ids, a later document's values change.
    leaky = {**packed, "segment_ids": (packed["segment_ids"] > 0).astype(np.int32),
             "positions": np.where(packed["segment_ids"] > 0,
                                   np.cumsum(packed["segment_ids"] > 0, axis=1) - 1, 0)}
    assert not np.allclose(_per_token(cfg, params, leaky)[1], val_p, atol=1e-3)
    assert len(placed) > 3


def test_packed_batches_resume_exactly_and_raise_the_nonpad_share(setup):
    records, tok = setup
    mesh = make_mesh((1, 1, 1), devices=jax.devices()[:1])
    fmt = prompts.Renderer("policy", tok)
    plain = data.BatchIterator(records, fmt, data.PipelineConfig(global_batch_size=4, max_len=256, seed=2), mesh,
                               pad_id=tok.pad_id)
    cfg = data.PipelineConfig(global_batch_size=4, max_len=256, seed=2, pack=True)
    packed = data.BatchIterator(records, fmt, cfg, mesh, pad_id=tok.pad_id)
    share = lambda b: float(np.mean(np.asarray(b["segment_ids"]) > 0))  # noqa: E731
    before = np.mean([share(next(plain)) for _ in range(5)])
    first = [next(packed) for _ in range(3)]
    after = np.mean([share(b) for b in first])
    assert after > 1.5 * before, (before, after)
    assert packed.stats["examples"] > 3 * 4 and all(len(ids) >= 1 for ids in first[0]["id"])
    state = packed.get_state()
    rest = [next(packed) for _ in range(4)]   # crosses an epoch of 40 records
    again = data.BatchIterator(records, fmt, cfg, mesh, pad_id=tok.pad_id)
    again.set_state(state)
    for a, b in zip(rest, [next(again) for _ in range(4)]):
        assert a["id"] == b["id"]
        for k in data.BATCH_KEYS:
            np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]))
    assert again.stats == packed.stats


def test_training_with_packing_resumes_exactly(setup, tmp_path):
    from tests.test_train import _Crash, _config, _crash_at, _max_diff, _metrics
    records, tok = setup
    path = str(tmp_path / "tok.model")
    with open(path, "wb") as f:
        f.write(tok.serialized)
    mesh = make_mesh((1, 1, 1), devices=jax.devices()[:1])
    runs = {}
    for name in ("straight", "crashed"):
        c = _config(path, tmp_path / name, total_steps=6, checkpoint_every=2, log_every=1)
        c.data.pack, c.data.max_len = True, 256
        if name == "crashed":
            with pytest.raises(_Crash):
                trainer.train(c, source=_crash_at(3), records=records, mesh=mesh)
        runs[name] = trainer.train(c, records=records, mesh=mesh)[1]
    a, b = _metrics(tmp_path / "straight"), _metrics(tmp_path / "crashed")
    assert [r["loss"] for r in a] == [r["loss"] for r in b] and a[-1]["nonpad_fraction"] > 0.5
    assert _max_diff(runs["straight"], runs["crashed"]) == 0.0
