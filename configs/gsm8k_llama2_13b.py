"""GLoRe's GSM8K setting with LLaMA-2 13B on a TPU pod; as `gsm8k_llama2_7b.py` with the larger model."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gsm8k_llama2_7b as base  # noqa: E402

CHECKPOINT = "ckpt/llama2_13b"
TOKENIZER = "ckpt/llama2_13b/tokenizer.model"


def get_config(stage: str | None = None):
    c = base.shared(CHECKPOINT, TOKENIZER)
    c.model.preset = "llama2_13b"
    return base.stage_config(c, stage)
