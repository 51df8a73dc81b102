"""GLoRe's GSM8K setting with LLaMA-2 7B on a TPU pod (Havrilla et al. 2024, section 4).

    bash launch/tpu_pod.sh all --name glore-7b --zone <zone> --accelerator v5p-16 --spot \
        -- --config=configs/gsm8k_llama2_7b.py:sorm --config.workdir=/mnt/glore/7b/sorm

Start from a converted checkpoint (`python -m glore_jax.convert --hf_dir
Llama-2-7b-hf --out_dir <ckpt>`) and the model's own sentencepiece file; the
embedding gains rows for glore_jax's control tokens on load. Params are
sharded fully over the pod (fsdp=-1) and compute runs in bf16 with
rematerialised layers. The paper fine-tunes every model for a few epochs at
a small learning rate; the step counts here are about 2 epochs of GSM8K's
7473 problems at batch 128 (value stages: their labelled-sample counts vary,
set total_steps from them).
"""

from glore_jax.recipe.config import add_pipeline, stage_config
from glore_jax.training.config import base_config, locked

CHECKPOINT = "ckpt/llama2_7b"                      # python -m glore_jax.convert --out_dir
TOKENIZER = "ckpt/llama2_7b/tokenizer.model"       # the HF repo's sentencepiece file
# stage -> (total_steps, learning_rate)
STEPS = {"policy": (120, 1e-5), "ei": (120, 1e-5), "orm": (1000, 1e-6), "sorm": (1000, 1e-6), "global_refiner": (300, 1e-5),
         "local_refiner": (300, 1e-5)}


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
    # What fits (AOT, `python -m glore_jax.compile --topology=...`, results/aot/, README "Scaling out"):
    #   v5p:2x2x2 (v5p-16, 95 GiB chips), as is: 7B train step 32.8 GiB, sampler 25.6 GiB peak per chip;
    #     13B 57.6 / 38.3 GiB (2026-12-04).
    #   v5e:4x4 (16 GiB chips), 7B: add --config.train.grad_accum=4 --config.glore.sample_rows=128
    #     (train 13.4, prefill 7.7, decode 14.2 GiB); as is the train step needs 16.6 GiB and the
    #     sampler's decode loop 16.3 GiB.
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
    c.train.batch_size = 128
    c.train.warmup_steps = 20
    c.train.weight_decay = 0.0
    c.train.log_every = 5
    c.train.eval_every = 50
    c.train.eval_batches = 4
    c.train.checkpoint_every = 50
    # The paper's sampling budget: K=96 samples per question for Expert
    # Iteration, 8 rollouts per step prefix for SORM labels.
    add_pipeline(c, STEPS, ei_rounds=1, ei_k=96, ei_from_base=True, orm_k=16, sorm_k=8, sorm_solutions=0,
                 temperature=1.0, max_new_tokens=320, max_prompt_len=768, sample_rows=256, shard_size=256)
    return c


def get_config(stage: str | None = None):
    return stage_config(locked(shared()), stage or "policy")
