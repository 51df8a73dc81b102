"""Prompt formats: one registry (`formats`) of what each format renders, over one layout (`layout`).

    from glore_jax import prompts
    fmt = prompts.get("global_refiner")
    ids = fmt.prompt(tok, {"question": q, "draft": d})           # what a sampler continues
    example = fmt.example(tok, {"question": q, "draft": d, "target": t})   # for training
"""

from glore_jax.prompts.formats import (FORMATS, LATRO_ANSWERS, LATRO_STOPS, PromptFormat, Renderer, check_record, get, global_refiner_example,
                                       global_refiner_prompt, latro_answer, local_refiner_example, local_refiner_prompt,
                                       policy_example, policy_prompt, register, self_correct_prompt,
                                       value_example, SELF_CORRECT_INSTRUCTION)
from glore_jax.prompts import agent_formats  # noqa: F401  registers the agent's format
from glore_jax.prompts.layout import (Example, FitResult, fit, fit_prompt, local_continuation, mark_bad_step,
                                      num_scorable_positions, splice_local)

__all__ = [
    "FORMATS", "LATRO_ANSWERS", "LATRO_STOPS", "PromptFormat", "Renderer", "check_record", "get", "register", "Example", "FitResult", "fit", "fit_prompt",
    "global_refiner_example", "global_refiner_prompt", "latro_answer", "local_continuation", "local_refiner_example",
    "local_refiner_prompt", "mark_bad_step", "num_scorable_positions", "policy_example", "policy_prompt",
    "SELF_CORRECT_INSTRUCTION", "self_correct_prompt", "splice_local", "value_example",
]
