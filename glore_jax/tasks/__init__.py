"""Tasks: solution structure, answer grading and the synthetic step checker.

Every task (gsm8k, svamp, synthetic) shares one record schema, see
`glore_jax.data.records`, and one solution layout: steps one per line, then
`#### N`.
"""

from glore_jax.tasks.answers import (answers_match, extract_answer, format_number, is_correct,
                                     normalize_number, parse_number)
from glore_jax.tasks.arithmetic import ExpressionError, evaluate
from glore_jax.tasks.programs import ProgramConfig
from glore_jax.tasks.steps import SolutionLines, annotations, join_solution, solution_lines, split_steps
from glore_jax.tasks.synthetic import (ERROR_KINDS, SyntheticConfig, first_wrong_step, generate_split,
                                       inject_error, render_solution)

TASKS = ("gsm8k", "svamp", "synthetic", "programs")
# Generated tasks: no source files; they train their own tokenizer.
GENERATED_TASKS = ("synthetic", "programs")

__all__ = [
    "GENERATED_TASKS", "TASKS", "SyntheticConfig", "ProgramConfig", "SolutionLines", "ExpressionError", "ERROR_KINDS",
    "answers_match", "annotations", "evaluate", "extract_answer", "first_wrong_step", "format_number",
    "generate_split", "inject_error", "is_correct", "join_solution", "normalize_number", "parse_number",
    "render_solution", "solution_lines", "split_steps",
]
