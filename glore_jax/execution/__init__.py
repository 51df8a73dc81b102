"""Local execution of candidate programs (RefineRL's tool): the AST whitelist (`policy`) and the limited
child process that runs a program on tests (`executor`)."""

from glore_jax.execution.executor import Limits, Report, run_many, run_tests
from glore_jax.execution.policy import BUILTINS, refusal

__all__ = ["BUILTINS", "Limits", "Report", "refusal", "run_many", "run_tests"]
