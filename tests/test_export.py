"""HF export: transformers loads the model, tokenizer and value head and agrees with glore_jax to 1e-4."""

import importlib.util
import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from glore_jax import errors, export
from glore_jax import models as M
from glore_jax.models.checkpoints import save_model
from glore_jax.tokenizer import CONTROL_TOKENS, Tokenizer
from glore_jax.training import config as config_lib, inputs

ROOT = pathlib.Path(__file__).resolve().parents[1]
TEXTS = ("Noah has 12 apples.\nHe eats 3 apples.", " leading space and  two", "[FIX] stays plain text")


def _smoke_config(workdir, tokenizer=""):
    spec = importlib.util.spec_from_file_location("smoke", ROOT / "configs" / "smoke.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    c.workdir, c.data.tokenizer = str(workdir), tokenizer
    return c


def _workdir(root, heads="lm", tokenizer="", step=7):
    """A finished workdir as training leaves it: config.json, model/, train_done.json; and its tokenizer."""
    c = _smoke_config(root, tokenizer)
    exp = config_lib.experiment(c)
    tok = inputs.load_tokenizer(exp.data)  # a generated task's tokenizer is cached under data_dir, as in training
    cfg = M.preset("tiny", vocab_size=config_lib.round_vocab(tok.vocab_size))
    params = M.init_params(cfg, jax.random.key(3))
    params = jax.tree_util.tree_map(lambda x: x * 4.0 if x.ndim > 1 else x, params)  # logits that vary
    if heads != "lm":
        cfg, params = M.value_model_from_policy(cfg, params, jax.random.key(4), share_backbone=heads == "lm+value")
        head = params["value_head"]
        params["value_head"] = {"kernel": head["kernel"] * 4.0, "bias": head["bias"] + 0.3}
    root.mkdir(parents=True, exist_ok=True)
    save_model(str(root / "model"), cfg, params)
    (root / "config.json").write_text(exp.source_json)
    (root / "train_done.json").write_text(json.dumps({"step": step, "objective": "sft"}))
    return cfg, params, tok


def _torch(x):
    import torch
    return torch.tensor(np.asarray(x))


def _check_tokenizer(out, tok):
    import transformers
    hf = transformers.AutoTokenizer.from_pretrained(str(out))
    assert [hf.convert_tokens_to_ids(n) for n in CONTROL_TOKENS] == [tok.control_id(n) for n in CONTROL_TOKENS]
    assert [tok.control_id(n) for n in CONTROL_TOKENS] == list(range(tok.sp_vocab_size, tok.vocab_size))
    for text in TEXTS:
        assert hf(text)["input_ids"] == tok.encode(text, bos=True), text
    # Opting in to control names in text reads them like `encode_markup`.
    assert hf("Q[FIX] x", split_special_tokens=False)["input_ids"] == [tok.bos_id] + tok.encode_markup("Q[FIX] x")
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (tok.bos_id, tok.eos_id, tok.pad_id)


def test_cli_exports_policy_with_logit_parity_and_tokenizer(tmp_path):
    import torch
    import transformers
    cfg, params, tok = _workdir(tmp_path / "w")
    out = tmp_path / "hf"
    proc = subprocess.run([sys.executable, "-m", "glore_jax.export", f"--workdir={tmp_path / 'w'}", f"--out={out}"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Exported LlamaForCausalLM" in proc.stdout
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    tokens = np.random.default_rng(2).integers(0, tok.vocab_size, (2, 19))
    with torch.no_grad():
        ref = hf(_torch(tokens)).logits.numpy()
    ours = np.asarray(M.policy_logits(cfg, params, tokens))
    assert ref.std() > 0.5 and np.max(np.abs(ours - ref)) <= 1e-4
    _check_tokenizer(out, tok)
    summary = json.loads((out / "glore_export.json").read_text())
    assert (summary["step"], summary["heads"], summary["architecture"]) == (7, ["lm"], "LlamaForCausalLM")
    assert summary["tokenizer"]["hf_tokenizer"].startswith("ids match")
    assert (out / "tokenizer.json").exists() and not (out / "value_head.safetensors").exists()
    # The padded embedding rows (no tokenizer id) are never generated.
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["suppress_tokens"] == list(range(tok.vocab_size, cfg.vocab_size)) and len(gen["suppress_tokens"]) > 0
    prompt = hf.generation_config  # loaded from the export
    assert prompt.eos_token_id == tok.eos_id
    ids = hf.generate(_torch([tok.encode("Noah has", bos=True)]), max_new_tokens=12, do_sample=False)
    assert int(ids.max()) < tok.vocab_size


def _values_from_side_file(out, hidden):
    from safetensors.numpy import load_file
    head = load_file(str(out / export.VALUE_HEAD_FILE))
    assert head["value_head.kernel"].ndim == 1 and head["value_head.bias"].shape == ()
    return hidden @ head["value_head.kernel"] + head["value_head.bias"]


@pytest.mark.parametrize("heads", ["lm+value", "value"])
def test_value_head_on_transformers_hidden_state_matches(tmp_path, tokenizer_path, heads):
    import torch
    import transformers
    cfg, params, tok = _workdir(tmp_path / "w", heads=heads, tokenizer=tokenizer_path)
    out = tmp_path / "hf"
    if heads == "value":  # a bare saved model (no experiment config beside it) needs --tokenizer
        save_model(str(tmp_path / "bare"), cfg, params)
        with pytest.raises(errors.MissingPathError, match="--tokenizer"):
            export.export(str(tmp_path / "bare"), str(out))
        summary = export.export(str(tmp_path / "bare"), str(out), tokenizer=tokenizer_path)
        assert summary["step"] is None
    else:  # a workdir's model/ finds the tokenizer and step through the workdir
        summary = export.export(str(tmp_path / "w" / "model"), str(out))
        assert summary["step"] == 7 and summary["tokenizer"]["source"] == tokenizer_path
    assert summary["heads"] == list(cfg.heads)
    tokens = np.random.default_rng(5).integers(0, tok.vocab_size, (2, 17))
    ours = np.asarray(M.apply(cfg, params, tokens, want_logits=False).values)
    if heads == "lm+value":
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
        with torch.no_grad():
            o = hf(_torch(tokens), output_hidden_states=True)
            base = hf.model(_torch(tokens)).last_hidden_state.numpy()
        # hidden_states[-1] is the final-normed state, the one the value head reads.
        np.testing.assert_allclose(o.hidden_states[-1].numpy(), base, atol=1e-6)
        assert np.max(np.abs(o.logits.numpy() - np.asarray(M.policy_logits(cfg, params, tokens)))) <= 1e-4
    else:
        assert summary["architecture"] == "LlamaModel"
        hf, info = transformers.AutoModel.from_pretrained(str(out), output_loading_info=True)
        assert type(hf).__name__ == "LlamaModel" and not any(info.values()), info  # no missing/unexpected names
        with torch.no_grad():
            base = hf.eval()(_torch(tokens)).last_hidden_state.numpy()
    values = _values_from_side_file(out, base)
    assert ours.std() > 0.1 and np.max(np.abs(values - ours)) <= 1e-4
    doc = json.loads((out / export.VALUE_HEAD_DOC).read_text())
    assert doc["heads"] == list(cfg.heads) and "sigmoid" in doc["probability"]
    _check_tokenizer(out, Tokenizer.load(tokenizer_path))


def test_bad_input_is_one_error_line(tmp_path, tokenizer_path):
    missing = tmp_path / "no_such_workdir"
    proc = subprocess.run([sys.executable, "-m", "glore_jax.export", f"--workdir={missing}", f"--out={tmp_path / 'o'}"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    errors_lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors_lines) == 1 and str(missing) in errors_lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "mine.txt").write_text("not an export")
    with pytest.raises(errors.ConfigError, match="not empty"):
        export.export(str(tmp_path), str(tmp_path / "o"), tokenizer=tokenizer_path)  # fails before any load
