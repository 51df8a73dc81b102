"""Errors a user can fix, and the one place the command lines turn them into a single line.

A `UserError` means the input was wrong (a config key, a record, a file, a
checkpoint on disk), not the code. The command lines (`glore_jax.train`,
`glore_jax.pipeline`) print such an error as one `error: ...` line naming
the key, file or path, and exit with code 2; any other exception is a bug in
glore_jax and keeps its traceback. `--verbose` shows the traceback of user
errors too.

Each subclass also derives from the builtin exception a caller would
naturally catch (`ValueError`, `FileNotFoundError`, ...), so library code
keeps working with plain `except ValueError`.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable


class UserError(Exception):
    """Bad input, fixable by the user; the message names what to change."""


class ConfigError(UserError, ValueError):
    """A config key has an invalid value or cannot apply; the message names the key."""


class DataError(UserError, ValueError):
    """A data file or record is malformed; the message names the file, line and field."""


class MissingPathError(UserError, FileNotFoundError):
    """A path the config names does not exist."""


class TokenizerError(UserError, ValueError):
    """A tokenizer file that sentencepiece cannot load; the message names the path."""


class CheckpointError(UserError, RuntimeError):
    """No usable checkpoint where one is needed; the message says what to do."""


class WorkdirLocked(UserError, RuntimeError):
    """Another live process writes to this workdir; the message names its pid and host."""


EXIT_USER_ERROR = 2


def run_cli(main: Callable[[], object], *, verbose: bool) -> None:
    """Runs `main`; a `UserError` becomes one line on stderr and exit code 2."""
    try:
        main()
    except UserError as e:
        if verbose:
            traceback.print_exc()
        message = str(e).replace("\n", " ")
        print(f"error: {message}", file=sys.stderr, flush=True)
        sys.exit(EXIT_USER_ERROR)
