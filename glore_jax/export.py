"""Export a trained model to a Hugging Face directory that `transformers` loads as is.

`python -m glore_jax.export --workdir W --out DIR` reads a finished workdir
(its `model/`), one still training (its newest intact checkpoint) or a saved
model dir, and writes into DIR:
  config.json, model.safetensors   `convert.to_hf`: LlamaForCausalLM (Mistral with a sliding
                                   window); a value-only model has no LM head, so its backbone is
                                   written as a plain LlamaModel (`AutoModel`), canonical names
                                   `embed_tokens.weight`, `layers.N.*`, `norm.weight`;
  generation_config.json           our bos/eos/pad ids, and the embedding rows past the tokenizer
                                   (`round_vocab` padding, never trained as targets) suppressed;
  tokenizer.model, tokenizer.json, tokenizer_config.json
                                   our sentencepiece model and control tokens at our ids; the
                                   export checks that `AutoTokenizer` encodes probe texts exactly as
                                   `Tokenizer.encode(text, bos=True)` does (recorded in the summary);
  value_head.safetensors, glore_value_head.json
                                   the value head (ORM/SORM), which no HF class has, and how to apply it;
  glore_export.json                what was exported from where (the summary `export` returns).
The tokenizer is the one the run trained with: `data.tokenizer`, or the one a
generated task trained and cached under `data.data_dir` (found through the
workdir's `config.json`); `--tokenizer` names one explicitly.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

from absl import flags

from glore_jax import cli, files
from glore_jax.errors import ConfigError, MissingPathError

VALUE_HEAD_FILE = "value_head.safetensors"
VALUE_HEAD_DOC = "glore_value_head.json"
SUMMARY_FILE = "glore_export.json"
# Plain text only: leading spaces, blank lines, digits, bytes, and a control name that must stay text.
_PROBES = ("Noah has 12 apples.\nHe eats 3.", "  two  spaces\n\nx", "ünï 漢字 🙂", "[BAD] is text, not a token")


def _experiment_config(path: str) -> tuple[str, dict] | None:
    """(workdir, its experiment config) for a workdir or its `model/` dir; None for a bare saved model."""
    for workdir in (path, os.path.dirname(path)):
        cfg_path = os.path.join(workdir, "config.json")
        if os.path.isfile(cfg_path):
            cfg = files.read_json_file(cfg_path)
            if isinstance(cfg, dict) and "data" in cfg and "objective" in cfg:  # not a HF config.json
                return workdir, cfg
    return None


def load_tokenizer(path: str, tokenizer: str = ""):
    """The tokenizer the run at `path` trained with (or the file `tokenizer`); (Tokenizer, its source)."""
    from glore_jax.tokenizer import Tokenizer
    from glore_jax.training import config as config_lib, inputs
    if tokenizer:
        return Tokenizer.load(tokenizer), os.path.abspath(tokenizer)
    found = _experiment_config(path)
    if found is None:
        raise MissingPathError(f"{path} has no experiment config.json (it is not a training workdir) to find its "
                               "tokenizer: pass --tokenizer=PATH.model")
    workdir, raw = found
    try:
        c = config_lib.base_config()
        c.update(raw)  # over the defaults: a config saved before a key existed lacks it
        c.workdir = workdir  # the workdir may have moved since training; data_dir defaults under it
        data = config_lib.experiment(c).data
    except (KeyError, AttributeError, TypeError, ValueError) as e:
        raise ConfigError(f"cannot read the data config of {workdir}/config.json ({type(e).__name__}: {e}); "
                          "pass --tokenizer=PATH.model") from None
    if data.tokenizer:
        return Tokenizer.load(data.tokenizer), os.path.abspath(data.tokenizer)
    # A generated task's tokenizer is cached under data_dir; never train a new one (it might differ).
    if not os.path.isdir(os.path.join(data.data_dir, "tokenizers")):
        raise MissingPathError(f"no cached tokenizer under {data.data_dir}/tokenizers (data.data_dir of "
                               f"{workdir}/config.json, relative to where training ran): pass --tokenizer=PATH.model")
    tok, cache = inputs.load_tokenizer(data), os.path.abspath(os.path.join(data.data_dir, "tokenizers"))
    same = [n for n in sorted(os.listdir(cache)) if pathlib.Path(cache, n).read_bytes() == tok.serialized]
    return tok, os.path.join(cache, same[0]) if same else cache


def write_tokenizer(tok, out_dir: str) -> dict[str, Any]:
    """tokenizer.model + tokenizer_config.json, and tokenizer.json once `transformers` is checked to match.

    `PreTrainedTokenizerFast` built from the sentencepiece proto with `legacy=True` keeps sentencepiece's
    dummy prefix on every text, even one that starts with a space (`LlamaTokenizer` drops it there).
    `split_special_tokens=True`: like `Tokenizer.encode`, text never becomes a control token; control
    tokens go in by id, or per call with `split_special_tokens=False` (then it matches `encode_markup`).
    """
    import sentencepiece as spm

    from glore_jax.tokenizer import CONTROL_TOKENS
    sp = spm.SentencePieceProcessor(model_proto=tok.serialized)
    with open(os.path.join(out_dir, "tokenizer.model"), "wb") as f:
        f.write(tok.serialized)
    added = {str(tok.control_id(n)): {"content": n, "lstrip": False, "rstrip": False, "normalized": False,
                                      "single_word": False, "special": True} for n in CONTROL_TOKENS}
    files.write_json(os.path.join(out_dir, "tokenizer_config.json"), {
        "tokenizer_class": "PreTrainedTokenizerFast", "legacy": True, "split_special_tokens": True,
        "bos_token": sp.id_to_piece(tok.bos_id), "eos_token": sp.id_to_piece(tok.eos_id),
        "pad_token": sp.id_to_piece(tok.pad_id), "unk_token": sp.id_to_piece(sp.unk_id()),
        "add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": added, "model_max_length": 1_000_000}, indent=2)
    info = {"sp_vocab_size": tok.sp_vocab_size, "vocab_size": tok.vocab_size,
            "control_tokens": {n: tok.control_id(n) for n in CONTROL_TOKENS}}
    try:
        import transformers
        hf = transformers.AutoTokenizer.from_pretrained(out_dir)
        matches = all(hf(t)["input_ids"] == tok.encode(t, bos=True) for t in _PROBES) and all(
            hf.convert_tokens_to_ids(n) == i for n, i in info["control_tokens"].items())
    except Exception as e:  # noqa: BLE001  an old or absent transformers: tokenizer.model stays the reference
        return {**info, "hf_tokenizer": f"not checked: {type(e).__name__}: {str(e)[:200]}"}
    if not matches:
        return {**info, "hf_tokenizer": f"transformers {transformers.__version__} encodes differently; "
                "no tokenizer.json written, use tokenizer.model with sentencepiece"}
    hf.backend_tokenizer.save(os.path.join(out_dir, "tokenizer.json"))
    return {**info, "hf_tokenizer": f"ids match Tokenizer.encode(bos=True) (transformers {transformers.__version__})"}


def write_model(cfg, params, tok, out_dir: str) -> str:
    """config.json + model.safetensors (+ the value head side files); returns the HF architecture."""
    import numpy as np
    from safetensors.numpy import load_file, save_file

    from glore_jax import convert
    if "lm" in cfg.heads:
        convert.to_hf(cfg, params, out_dir)
    else:  # to_hf without an LM head (tied: no lm_head tensor), then LlamaModel's own names
        convert.to_hf(cfg.replace(heads=("lm",), tie_embeddings=True), {"backbone": params["backbone"]}, out_dir)
        weights = os.path.join(out_dir, "model.safetensors")
        save_file({k.removeprefix("model."): v for k, v in load_file(weights).items()}, weights,
                  metadata={"format": "pt"})
    hf_cfg = files.read_json_file(os.path.join(out_dir, "config.json"))
    if "lm" not in cfg.heads:
        hf_cfg.update(architectures=["MistralModel" if cfg.sliding_window else "LlamaModel"],
                      tie_word_embeddings=False)
    ids = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}
    files.write_json(os.path.join(out_dir, "config.json"), {**hf_cfg, **ids}, indent=2)
    if "lm" in cfg.heads:  # padded rows: no tokenizer id maps to them, so generate must never pick one
        files.write_json(os.path.join(out_dir, "generation_config.json"),
                         {**ids, "suppress_tokens": list(range(tok.vocab_size, cfg.vocab_size)) or None}, indent=2)
    if "value" in cfg.heads:
        head = params["value_head"]
        save_file({"value_head.kernel": np.asarray(head["kernel"], np.float32),
                   "value_head.bias": np.asarray(head["bias"], np.float32).reshape(())},
                  os.path.join(out_dir, VALUE_HEAD_FILE), metadata={"format": "pt"})
        files.write_json(os.path.join(out_dir, VALUE_HEAD_DOC), {
            "file": VALUE_HEAD_FILE, "heads": list(cfg.heads),
            "hidden_state": "the last hidden state after the final RMSNorm: `last_hidden_state` of the base "
                            "model (model.model(ids) for a CausalLM), = output_hidden_states[-1]",
            "value_logit": "hidden @ value_head.kernel + value_head.bias, one per token [B, T]",
            "probability": "sigmoid(value_logit) = P(final answer correct | prefix up to this token)"}, indent=2)
    return hf_cfg["architectures"][0]


def _step(path: str) -> int | None:
    """The trained step: train_done.json of a finished workdir, else its newest checkpoint's (None: unknown)."""
    for workdir in (path, os.path.dirname(path)) if os.path.basename(path) == "model" else (path,):
        done = os.path.join(workdir, "train_done.json")
        if os.path.isfile(done) and os.path.isdir(os.path.join(workdir, "model")):
            return files.read_json_file(done).get("step")
    ckpts = os.path.join(path, "checkpoints")  # in progress; load_init skips a corrupt newest step
    return max((int(s) for s in os.listdir(ckpts) if s.isdigit()), default=None) if os.path.isdir(ckpts) else None


def _prepare(out_dir: str) -> None:
    """Writes only into an empty dir or over an earlier export, whose optional files are removed first
    (a stale tokenizer.json or value head would otherwise survive and be read as this model's)."""
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        if not os.path.isfile(os.path.join(out_dir, SUMMARY_FILE)):
            raise ConfigError(f"--out {out_dir} is not empty and holds no earlier export ({SUMMARY_FILE}); "
                              "choose a new directory")
        for name in (VALUE_HEAD_FILE, VALUE_HEAD_DOC, "generation_config.json", "tokenizer.json", SUMMARY_FILE):
            if os.path.exists(os.path.join(out_dir, name)):
                os.remove(os.path.join(out_dir, name))
    os.makedirs(out_dir, exist_ok=True)


def export(path: str, out_dir: str, tokenizer: str = "") -> dict[str, Any]:
    """Writes the HF export of the model at `path` (workdir or saved model) to `out_dir`; returns the summary."""
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise MissingPathError(f"--workdir {path} does not exist")
    tok, tok_source = load_tokenizer(path, tokenizer)  # first: a missing tokenizer fails before the big load
    _prepare(out_dir)
    from glore_jax import sharding as shd
    from glore_jax.models.params import count_params
    from glore_jax.training.checkpoints import load_init
    from glore_jax.training.config import check_vocab
    cfg, params = load_init(path, shd.single_device_mesh())
    check_vocab(cfg, tok.vocab_size)
    arch = write_model(cfg, params, tok, out_dir)
    tok_info = write_tokenizer(tok, out_dir)
    summary = {
        "source": path, "step": _step(path), "architecture": arch, "heads": list(cfg.heads),
        "params": count_params(params), "model_config": json.loads(cfg.to_json()),
        "tokenizer": {"source": tok_source, **tok_info},
        "vocab_note": (f"model vocab {cfg.vocab_size} >= tokenizer vocab {tok.vocab_size}: ids {tok.vocab_size}.."
                       f"{cfg.vocab_size - 1} are padding rows no token maps to"
                       + (" (suppressed in generation_config.json)" if "lm" in cfg.heads else "")),
        "files": sorted(os.listdir(out_dir)) + [SUMMARY_FILE]}
    files.write_json(os.path.join(out_dir, SUMMARY_FILE), summary, indent=2)
    return summary


_WORKDIR = flags.DEFINE_string("workdir", None, "A training workdir (finished or in progress) or a saved model dir.")
_OUT = flags.DEFINE_string("out", None, "Where to write the Hugging Face directory.")
_TOKENIZER = flags.DEFINE_string("tokenizer", "", "A sentencepiece model; default: the one the run trained with.")


def main(argv: list[str]) -> None:
    del argv
    s = export(_WORKDIR.value, _OUT.value, _TOKENIZER.value)
    print(f"Exported {s['architecture']} ({s['params'] / 1e6:.2f}M params, heads {s['heads']}, step {s['step']}) "
          f"and its tokenizer to {_OUT.value}")


if __name__ == "__main__":
    flags.mark_flags_as_required(["workdir", "out"])
    cli.main(main)
