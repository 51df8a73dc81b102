"""GLoRe's GSM8K setting with LLaMA-2 7B on a TPU pod (Havrilla et al. 2024, section 4).

    bash launch/tpu_pod.sh <tpu-name> <zone> configs/gsm8k_llama2_7b.py:sorm --config.workdir=/mnt/glore/7b/sorm

Start from a converted checkpoint (`python -m glore_jax.convert --hf_dir
Llama-2-7b-hf --out_dir <ckpt>`) and the model's own sentencepiece file; the
embedding gains rows for glore_jax's control tokens on load. Params are
sharded fully over the pod (fsdp=-1) and compute runs in bf16 with
rematerialised layers. The paper fine-tunes every model for a few epochs at
a small learning rate; the step counts here are about 2 epochs of GSM8K's
7473 problems at batch 128 (value stages: their labelled-sample counts vary,
set total_steps from them).
"""

from glore_jax.training.config import base_config, locked

CHECKPOINT = "ckpt/llama2_7b"                      # python -m glore_jax.convert --out_dir
TOKENIZER = "ckpt/llama2_7b/tokenizer.model"       # the HF repo's sentencepiece file
STAGES = {
    "policy": ("sft", "policy", {"total_steps": 120, "learning_rate": 1e-5}),
    "orm": ("orm", "orm", {"total_steps": 1000, "learning_rate": 1e-6}),
    "sorm": ("sorm", "sorm", {"total_steps": 1000, "learning_rate": 1e-6}),
    "global_refiner": ("sft", "global_refiner", {"total_steps": 300, "learning_rate": 1e-5}),
    "local_refiner": ("sft", "local_refiner", {"total_steps": 300, "learning_rate": 1e-5}),
}


def shared(checkpoint: str = CHECKPOINT, tokenizer: str = TOKENIZER):
    c = base_config()
    c.init_from = checkpoint
    c.model.preset = "llama2_7b"   # shapes come from the checkpoint; the preset documents them
    c.model.dtype = "bfloat16"
    c.model.remat = True
    c.data.task = "gsm8k"
    c.data.manual_dir = "../shared/data/gsm8k"
    c.data.tokenizer = tokenizer
    c.data.max_len = 1024
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
    c.train.batch_size = 128
    c.train.warmup_steps = 20
    c.train.weight_decay = 0.0
    c.train.log_every = 5
    c.train.eval_every = 50
    c.train.eval_batches = 4
    c.train.checkpoint_every = 50
    return c


def stage_config(c, stage: str | None):
    stage = stage or "policy"
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; valid stages: {list(STAGES)}")
    objective, prompt_format, train = STAGES[stage]
    c.objective, c.data.prompt_format = objective, prompt_format
    for key, value in train.items():
        c.train[key] = value
    return locked(c)


def get_config(stage: str | None = None):
    return stage_config(shared(), stage)
