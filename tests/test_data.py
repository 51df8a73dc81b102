"""TFDS array_record builds without TensorFlow, record sources, and the sharded Grain pipeline."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")  # if run without conftest

import importlib.util  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from glore_jax import data, prompts  # noqa: E402
from glore_jax.prompts import Example  # noqa: E402
from glore_jax.sharding import batch_sharding, make_mesh  # noqa: E402
from glore_jax.tasks import SyntheticConfig, first_wrong_step, is_correct  # noqa: E402
from glore_jax.tokenizer import Tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def gsm8k_dir(tmp_path_factory, shared_dir):
    data_dir = tmp_path_factory.mktemp("tfds")
    train = data.load("gsm8k", "train", data_dir, manual_dir=shared_dir / "data" / "gsm8k")
    return data_dir, train


def test_gsm8k_builds_from_local_files_without_tensorflow(gsm8k_dir, shared_dir):
    data_dir, train = gsm8k_dir
    assert "tensorflow" not in sys.modules and importlib.util.find_spec("tensorflow") is None
    test = data.load("gsm8k", "test", data_dir, manual_dir=shared_dir / "data" / "gsm8k")
    assert (len(train), len(test)) == (7473, 1319)
    assert list((data_dir / "glore_gsm8k" / "1.0.0").glob("*.array_record*"))
    ids = set()
    for record in (train[i] for i in range(0, len(train), 7)):
        assert set(record) == set(data.RECORD_FIELDS) and all(isinstance(v, str) for v in record.values())
        assert is_correct(record["answer"], record["gold"])
        ids.add(record["id"])
    assert len(ids) == len(range(0, len(train), 7))
    # a second load only opens the prepared files (no manual_dir, no download needed)
    assert len(data.load("gsm8k", "test", data_dir)) == 1319
    with pytest.raises(ValueError, match="splits"):
        data.load("gsm8k", "validation", data_dir)


def test_svamp_split_and_schema(tmp_path, shared_dir):
    train = data.load("svamp", "train", tmp_path, manual_dir=shared_dir / "data" / "svamp")
    test = data.load("svamp", "test", tmp_path)
    assert (len(train), len(test)) == (700, 300)
    assert not {r["id"] for r in train} & {r["id"] for r in test}
    record = test[0]
    assert record["answer"] == "" and "equation" in json.loads(record["meta"])
    assert "." not in record["gold"] or not record["gold"].endswith("0")


def test_synthetic_builds_deterministically(tmp_path):
    config = SyntheticConfig(train_size=120, test_size=30, seed=5)
    a = data.load("synthetic", "train", tmp_path / "a", synthetic=config)
    b = data.load("synthetic", "train", tmp_path / "b", synthetic=config)
    assert len(a) == 120 and len(data.load("synthetic", "test", tmp_path / "a", synthetic=config)) == 30
    assert sorted(r["question"] for r in a) == sorted(r["question"] for r in b)
    assert all(first_wrong_step(r, r["answer"]) is None for r in a)
    other = data.load("synthetic", "train", tmp_path / "a", synthetic=SyntheticConfig(train_size=60, test_size=10))
    assert len(other) == 60  # another config never reads back the first one's files
    with pytest.raises(ValueError, match="manual_dir"):
        data.make_builder("synthetic", tmp_path, manual_dir=tmp_path)


def _broken_gsm8k(tmp_path, shared_dir):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(shared_dir / "data" / "gsm8k" / "test.jsonl", src / "test.jsonl")
    lines = (shared_dir / "data" / "gsm8k" / "train.jsonl").read_text().splitlines()[:20]
    lines[6] = lines[6][:-5]  # truncated JSON on line 7
    lines[11] = json.dumps({"question": "q", "answer": "no final line"})  # line 12
    (src / "train.jsonl").write_text("\n".join(lines) + "\n")
    return src


def test_malformed_jsonl_names_file_and_line(tmp_path, shared_dir):
    src = _broken_gsm8k(tmp_path, shared_dir)
    path = src / "train.jsonl"
    with pytest.raises(data.MalformedRecordError, match=rf"{path}:line 7: invalid JSON"):
        list(data.read_gsm8k_jsonl(path, split="train"))
    stats = data.ReadStats()
    records = list(data.read_gsm8k_jsonl(path, split="train", skip_malformed=True, stats=stats))
    assert (len(records), stats.read, stats.skipped_malformed) == (18, 18, 2)
    with pytest.raises(data.MalformedRecordError, match=r"train\.jsonl:line 7"):
        data.load("gsm8k", "train", tmp_path / "tfds", manual_dir=src)
    builder = data.make_builder("gsm8k", tmp_path / "tfds2", manual_dir=src, skip_malformed=True)
    builder.download_and_prepare()
    assert builder.info.splits["train"].num_examples == 18
    assert builder.read_stats["train"].skipped_malformed == 2


def _tiny_source(n):
    return [{"i": str(k)} for k in range(n)]


def _tiny_format(record):
    k = int(record["i"])
    # length grows with k so some rows need truncation at small max_len
    prompt = [1] + [10 + k] * (k % 9)
    target = [100 + k, 2]
    return Example(tokens=np.asarray(prompt + target, np.int32),
                   loss_mask=np.asarray([0] * len(prompt) + [1, 1], np.float32),
                   step_end_mask=np.asarray([0] * len(prompt) + [1, 0], np.float32),
                   step_labels=np.asarray([-1] * len(prompt) + [0.5, -1], np.float32), prompt_len=len(prompt))


def test_batch_has_global_shape_and_sharding(gsm8k_dir, shared_dir):
    assert jax.device_count() == 8
    mesh = make_mesh((2, 2, 2))
    tok = Tokenizer.load(shared_dir / "tokenizers" / "mistral-7b-v0.1" / "tokenizer.model")
    _, train = gsm8k_dir
    config = data.PipelineConfig(global_batch_size=16, max_len=96, seed=1)
    batches = data.BatchIterator(train, lambda r: prompts.value_example(tok, r["question"], r["answer"]),
                                 config, mesh, pad_id=tok.pad_id)
    batch = next(batches)
    assert set(batch) == set(data.BATCH_KEYS) | set(data.HOST_FIELDS)
    assert len(batch["id"]) == 16 and all(i.startswith("gsm8k-train-") for i in batch["id"])
    assert len(batch["gold"]) == 16 and all(isinstance(g, str) and g for g in batch["gold"])
    expected = {"tokens": np.int32, "loss_mask": np.float32, "step_end_mask": np.float32,
                "step_labels": np.float32, "segment_ids": np.int32, "positions": np.int32}
    for key, dtype in expected.items():
        assert batch[key].shape == (16, 96) and batch[key].dtype == dtype, key
        assert batch[key].sharding == batch_sharding(mesh, 2)
        assert {s.data.shape for s in batch[key].addressable_shards} == {(4, 96)}  # batch over data*fsdp
    tokens = np.asarray(batch["tokens"])
    assert (tokens[np.asarray(batch["segment_ids"]) == 0] == tok.pad_id).all()
    assert np.asarray(batch["step_end_mask"]).sum() >= 16 * 2
    assert batches.stats["examples"] == 16 and batches.stats["prompt_truncated"] > 0


def _served(batch, row):
    """The tiny source index k of a batch row, read off its target token 100 + k."""
    tokens, ends = np.asarray(batch["tokens"])[row], np.asarray(batch["step_end_mask"])[row]
    return int(tokens[ends == 1][0]) - 100


def test_resume_is_exact_and_truncation_counted():
    mesh = make_mesh((2, 2, 2))
    config = data.PipelineConfig(global_batch_size=8, max_len=6, seed=3)
    source = _tiny_source(20)  # 2 batches per epoch: resume crosses epochs
    run = data.BatchIterator(source, _tiny_format, config, mesh, pad_id=0)
    for _ in range(3):
        next(run)
    state = run.get_state()
    expected = [{k: np.asarray(v) for k, v in next(run).items()} for _ in range(4)]
    resumed = data.BatchIterator(source, _tiny_format, config, mesh, pad_id=0)
    resumed.set_state(json.loads(json.dumps(state)))  # the state must survive serialization
    assert resumed.stats == state["stats"]
    for want in expected:
        got = next(resumed)
        for key in data.BATCH_KEYS:
            np.testing.assert_array_equal(np.asarray(got[key]), want[key])
    # row k is k % 9 + 3 tokens long, so it is cut to max_len 6 when k % 9 > 3
    served = [_served(b, r) for b in expected for r in range(8)]
    assert resumed.stats["prompt_truncated"] - state["stats"]["prompt_truncated"] == sum(k % 9 > 3 for k in served)
    assert resumed.stats["examples"] == 7 * 8
    fresh = data.BatchIterator(source, _tiny_format, config, mesh, pad_id=0)
    first_two = [next(fresh) for _ in range(2)]
    epoch = [_served(b, r) for b in first_two for r in range(8)]
    assert sorted(epoch) != epoch and len(set(epoch)) == 16  # shuffled, no repeats within an epoch


def test_each_process_reads_its_rows_of_every_global_batch():
    import grain
    source = grain.MapDataset.source(_tiny_source(23)).shuffle(seed=5)
    whole = [r["i"] for r in data.process_rows(source, 0, 1, 8)]
    assert len(whole) == 16  # two global batches; the partial third is dropped
    shards = [[r["i"] for r in data.process_rows(source, p, 4, 2)] for p in range(4)]
    assert all(len(s) == 4 for s in shards)
    # Process p holds rows [2p, 2p+2) of each global batch: together they are the 1-process batches.
    rebuilt = [i for b in range(2) for s in shards for i in s[2 * b:2 * b + 2]]
    assert rebuilt == whole
    with pytest.raises(ValueError):
        data.process_rows(source, 4, 4, 2)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        data.BatchIterator(_tiny_source(4), _tiny_format, data.PipelineConfig(global_batch_size=8, max_len=8),
                           make_mesh((2, 2, 2)), pad_id=0)


def test_collate_pads_and_counts():
    batch, stats = data.collate([_tiny_format({"i": "0"}), _tiny_format({"i": "8"})], max_len=7, pad_id=0)
    assert batch["tokens"].shape == (2, 7)
    assert stats == {"examples": 2, "prompt_truncated": 1, "target_truncated": 0}
    assert batch["tokens"][0].tolist() == [1, 100, 2, 0, 0, 0, 0]
    assert batch["positions"][0].tolist() == [0, 1, 2, 0, 0, 0, 0]
    assert batch["step_labels"][0].tolist()[:3] == [-1, 0.5, -1]
    with pytest.raises(ValueError, match="max_len"):
        data.pad_example(_tiny_format({"i": "8"}), 3, 0)
