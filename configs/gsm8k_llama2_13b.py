"""GLoRe's GSM8K setting with LLaMA-2 13B on a TPU pod; as `gsm8k_llama2_7b.py` with the larger model.

Fits a v5p:2x2x2 slice (v5p-16) as is, by AOT compile: train step 57.6 GiB and sampler prefill
38.3 GiB peak per 95 GiB chip (2026-12-04) (`python -m glore_jax.compile --config=configs/gsm8k_llama2_13b.py
--topology=v5p:2x2x2`; results/aot/llama2_13b_v5p_2x2x2.json).
"""

import importlib.util
import os

from glore_jax.recipe.config import stage_config
from glore_jax.training.config import locked

# Config files are loaded by path, not as a package: load the 7B file beside this one.
_spec = importlib.util.spec_from_file_location(
    "gsm8k_llama2_7b", os.path.join(os.path.dirname(os.path.abspath(__file__)), "gsm8k_llama2_7b.py"))
base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(base)

CHECKPOINT = "ckpt/llama2_13b"
TOKENIZER = "ckpt/llama2_13b/tokenizer.model"


def get_config(stage: str | None = None):
    c = base.shared(CHECKPOINT, TOKENIZER)
    c.model.preset = "llama2_13b"
    return stage_config(locked(c), stage or "policy")
