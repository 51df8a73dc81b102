"""HF import: logit parity with transformers, sharded index files, CLI, clear errors."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from glore_jax import convert, errors
from glore_jax import models as M
from glore_jax import sharding as shd
from glore_jax.models.checkpoints import load_model
from tests.hf_reference import make_tiny_hf_llama


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf_llama")
    model = make_tiny_hf_llama(d, tie=False)
    return d, model


def _hf_logits(model, tokens):
    import torch
    with torch.no_grad():
        return model(torch.tensor(np.asarray(tokens))).logits.float().numpy()


def test_logit_parity_with_transformers_gqa_untied(hf_dir):
    d, model = hf_dir
    cfg, params = convert.from_hf(str(d))
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.tie_embeddings, cfg.rope_theta) == (4, 2, False, 500.0)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (3, 33))
    ours = np.asarray(M.policy_logits(cfg, params, tokens))
    ref = _hf_logits(model, tokens)
    assert ref.std() > 0.5  # the reference logits are not flat
    assert np.max(np.abs(ours - ref)) <= 1e-4


def test_parity_holds_sharded_on_mesh(hf_dir):
    d, model = hf_dir
    cfg, params = convert.from_hf(str(d))
    mesh = shd.make_mesh((2, 2, 2))
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (4, 16))
    pos = np.broadcast_to(np.arange(16), tokens.shape)
    ours = np.asarray(M.make_forward(cfg, mesh)(M.shard_params(cfg, params, mesh), tokens, pos))
    assert np.max(np.abs(ours - _hf_logits(model, tokens))) <= 1e-4


def test_tied_and_sharded_index_checkpoint(tmp_path):
    model = make_tiny_hf_llama(tmp_path / "src", tie=True, seed=3)
    # Re-save as a 2-file sharded checkpoint with an index.
    model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    cfg, params = convert.from_hf(str(tmp_path / "sharded"))
    assert cfg.tie_embeddings and "lm_head" not in params
    tokens = np.arange(20).reshape(2, 10)
    assert np.max(np.abs(np.asarray(M.policy_logits(cfg, params, tokens)) - _hf_logits(model, tokens))) <= 1e-4


def test_cli_writes_loadable_orbax_model(hf_dir, tmp_path):
    d, model = hf_dir
    out = tmp_path / "converted"
    proc = subprocess.run([sys.executable, "-m", "glore_jax.convert", f"--hf_dir={d}", f"--out_dir={out}"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    cfg, params = load_model(str(out), mesh=shd.make_mesh((2, 2, 2)))
    assert params["backbone"]["layers"]["attn"]["q"].sharding.spec == shd.logical_to_spec(
        ("layers", "embed", "heads", "head_dim"))
    tokens = np.arange(12).reshape(2, 6)
    assert np.max(np.abs(np.asarray(M.policy_logits(cfg, params, tokens)) - _hf_logits(model, tokens))) <= 1e-4


def test_unsupported_architecture_is_named(tmp_path, hf_dir):
    d, _ = hf_dir
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["GPTNeoXForCausalLM"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="Unsupported architecture 'GPTNeoXForCausalLM'"):
        convert.from_hf(str(tmp_path))
    cfg["architectures"] = ["LlamaForCausalLM"]
    cfg["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    cfg.pop("rope_parameters", None)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="rope scaling type 'yarn'"):
        convert.from_hf(str(tmp_path))


def test_missing_tensor_is_named(tmp_path, hf_dir):
    from safetensors.numpy import load_file, save_file
    d, _ = hf_dir
    tensors = load_file(str(d / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((d / "config.json").read_text())
    with pytest.raises(errors.DataError, match="model.layers.1.mlp.up_proj.weight"):
        convert.from_hf(str(tmp_path))


def test_export_to_hf_round_trips_with_parity(tmp_path):
    import transformers
    cfg = M.preset("tiny")
    params = M.init_params(cfg, jax.random.key(3))
    params = jax.tree_util.tree_map(lambda x: x * 4.0 if x.ndim > 1 else x, params)
    convert.to_hf(cfg, params, str(tmp_path))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    tokens = np.random.default_rng(2).integers(0, cfg.vocab_size, (2, 19))
    ours = np.asarray(M.policy_logits(cfg, params, tokens))
    assert np.max(np.abs(ours - _hf_logits(hf, tokens))) <= 1e-4
    cfg2, params2 = convert.from_hf(str(tmp_path))
    assert cfg2 == cfg
    jax.tree_util.tree_map(np.testing.assert_array_equal, params2, jax.tree_util.tree_map(np.asarray, params))
