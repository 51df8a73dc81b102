"""Every file in tests/malformed/ is bad input; each must end in a named error or a counted skip, never a traceback.

The file name's prefix says which reader or command line it targets:
    records_*.jsonl   data.store.RecordsFile (every stage's records, data.records)   -> DataError
    skip_*.jsonl      the same with data.skip_bad_records                            -> skipped and counted
    gsm8k_*, svamp_*  the raw task readers (data.records)                            -> MalformedRecordError
    tokenizer_*       Tokenizer.load                                                 -> TokenizerError
    config_*.py       training.config.experiment (the config check)                  -> ConfigError
    cli_*.args        python -m glore_jax.train <args>: one `error:` line, exit 2, no traceback
    prompt_*.json     a record rendered by a prompt format at a max_len: a named error, or the counts it states
"""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from glore_jax import errors, prompts
from glore_jax.data import records as raw_records
from glore_jax.data.batching import collate
from glore_jax.data.store import RecordsFile
from glore_jax.tokenizer import Tokenizer
from glore_jax.training import config as train_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
CORPUS = ROOT / "tests" / "malformed"
CASES = sorted(p.name for p in CORPUS.iterdir() if p.name.split("_", 1)[0] in
               ("records", "skip", "gsm8k", "svamp", "tokenizer", "config", "cli", "prompt")
               and p.suffix != ".txt")


def test_the_corpus_is_big_enough():
    assert len(CASES) >= 30, CASES


@pytest.fixture(scope="module")
def mistral(shared_dir):
    return Tokenizer.load(shared_dir / "tokenizers" / "mistral-7b-v0.1" / "tokenizer.model")


def _load_config(path: pathlib.Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def _cli(path: pathlib.Path) -> None:
    args = path.read_text().split()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    proc = subprocess.run([sys.executable, "-m", "glore_jax.train", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    err_lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == errors.EXIT_USER_ERROR, proc.stderr[-2000:]
    assert len(err_lines) == 1 and "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-2000:]
    return err_lines[0]


def _prompt(case: dict, tok: Tokenizer) -> dict[str, int]:
    example = prompts.Renderer(case["format"], tok)(case["record"])
    _, stats = collate([example], case["max_len"], tok.pad_id)
    return {"bad_markers": int(np.sum(example.tokens == tok.bad_id)),
            "prompt_truncated": int(stats["prompt_truncated"]), "target_truncated": int(stats["target_truncated"]),
            "positive_labels": int(np.sum(example.step_labels == 1.0))}


@pytest.mark.parametrize("name", CASES)
def test_bad_input_gives_a_named_error_or_a_counted_skip(name, mistral, tmp_path):
    path = CORPUS / name
    kind = name.split("_", 1)[0]
    if kind == "records":
        with pytest.raises(errors.DataError, match=rf"{path.name}:\d+: "):
            RecordsFile(path)
    elif kind == "skip":
        good = RecordsFile(path, skip_bad=True)
        assert good.skipped >= 1 and len(good) >= 1
        assert all(prompts.check_record(r) is None for r in good)
    elif kind == "gsm8k":
        with pytest.raises(raw_records.MalformedRecordError, match=rf"{path.name}:line \d+: "):
            list(raw_records.read_gsm8k_jsonl(path, split="train"))
        stats = raw_records.ReadStats()
        assert list(raw_records.read_gsm8k_jsonl(path, split="train", skip_malformed=True, stats=stats)) == []
        assert stats.skipped_malformed == 1
    elif kind == "svamp":
        with pytest.raises(raw_records.MalformedRecordError, match=path.name):
            list(raw_records.read_svamp_json(path))
    elif kind == "tokenizer":
        with pytest.raises(errors.TokenizerError, match=str(path)):
            Tokenizer.load(path)
    elif kind == "config":
        config = _load_config(path)
        with pytest.raises(errors.ConfigError):
            exp = train_config.experiment(config)
            from glore_jax.training import inputs
            inputs.load_tokenizer(exp.data)
    elif kind == "cli":
        line = _cli(path)
        assert len(line) < 400, line
    elif kind == "prompt":
        case = json.loads(path.read_text())
        if "error" in case["expect"]:
            with pytest.raises(getattr(errors, case["expect"]["error"])):
                _prompt(case, mistral)
        else:
            counts = _prompt(case, mistral)
            assert {k: counts[k] for k in case["expect"]["count"]} == case["expect"]["count"]
    else:
        raise AssertionError(f"no runner for {name}")


def test_a_missing_tokenizer_or_records_file_is_named():
    with pytest.raises(errors.MissingPathError, match="no_such.model"):
        Tokenizer.load("/nonexistent/no_such.model")
    with pytest.raises(errors.MissingPathError, match="no_such.jsonl"):
        RecordsFile("/nonexistent/no_such.jsonl")
