"""What the command lines share: flag parsing that names a bad config key, and one-line user errors.

`python -m glore_jax.train` and `python -m glore_jax.pipeline` run through
`main`: a bad flag or config override, or any `errors.UserError` raised
while running, prints one `error: ...` line and exits with code 2; a bug
keeps its traceback. `--verbose` shows the traceback of user errors too.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from absl import app, flags

from glore_jax import errors

_VERBOSE = flags.DEFINE_bool("verbose", False, "Show the traceback of user errors (bad config, data, paths) too.")


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(errors.EXIT_USER_ERROR)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parser; a bad flag, config file or override becomes one line naming it, and exit 2."""
    for arg in argv[1:]:
        if arg.startswith("--config="):
            path = arg.split("=", 1)[1].split(":", 1)[0]
            if not os.path.isfile(path):
                _fail(f"config file {path} does not exist (--config)")
    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError, flags.Error, errors.UserError, SyntaxError, OSError) as e:
        overrides = [a.split("=", 1)[0][len("--config."):] for a in argv[1:] if a.startswith("--config.")]
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        name = text.strip("\"'")
        bad = [o for o in overrides if name and name in o.split(".")]
        if bad and isinstance(e, (AttributeError, KeyError)):
            _fail(f"unknown config key {bad[0]!r} (no {name!r} at that level; check its spelling against the "
                  "config file)")
        _fail(text)


def main(run: Callable[[list[str]], object]) -> None:
    """`app.run(run)` with `parse_flags` and `UserError` -> one line, exit 2.

    When this process is a glore_jax command line (`python -m glore_jax.X`, not a test or a notebook
    calling `main`), it first restarts itself with glibc's huge-page malloc (`hardware.MALLOC_TUNABLE`)
    and its CPU split into XLA devices (two on a multi-core host, or GLORE_JAX_CPU_DEVICES)."""
    main_spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if main_spec is not None and main_spec.name.startswith("glore_jax."):
        from glore_jax import hardware
        try:
            hardware.reexec_with_launch_env()
        except ValueError as e:
            _fail(str(e))
    def wrapped(argv: list[str]) -> None:
        errors.run_cli(lambda: run(argv), verbose=_VERBOSE.value)
    app.run(wrapped, flags_parser=parse_flags)


def train_runs(configs: dict, records_for: Callable[[str], object] = lambda name: None) -> dict[str, float]:
    """Trains a recipe's runs in order (each resumes, or skips when finished); their wall seconds by name.
    `records_for(name)`: records a run trains on instead of its config's (None: the config's)."""
    import time

    from glore_jax import trainer
    timings = {}
    for name, c in configs.items():
        t0 = time.perf_counter()
        trainer.train(c, records=records_for(name))
        timings[name] = trainer.done_info(c.workdir).get("wall_seconds") or time.perf_counter() - t0
        print(f"{name}: done in {timings[name] / 60:.1f} min", flush=True)
    return timings


def recipe_main(run: Callable[[object], object], summarize: Callable[[list[str]], str], example: str) -> None:
    """A recipe command (`rl.score_recipe`, `rl.latro_recipe`): `--config=...` runs the recipe;
    `--summarize=DIR,...` prints one table over finished workdirs (one per seed), `--out` also writes it.

    The flags are defined here, when the command runs, not at import: config files import the recipes'
    knobs, and `glore_jax.train` defines its own `--config`.
    """
    from ml_collections import config_flags

    from glore_jax import files
    config = config_flags.DEFINE_config_file("config", None, "A recipe config.", lock_config=True)
    workdirs = flags.DEFINE_list("summarize", [], "Finished recipe workdirs (one per seed): print one table.")
    out = flags.DEFINE_string("out", "", "With --summarize: also write the table here.")

    def _main(argv) -> None:
        del argv
        if workdirs.value:
            md = summarize(workdirs.value)
            print(md)
            if out.value:
                files.write_atomic(out.value, md)
            return
        if config.value is None:
            raise errors.ConfigError(f"give --config={example} (or --summarize=DIR,DIR,...)")
        run(config.value)
    main(_main)
