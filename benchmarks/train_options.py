"""The JAX train step under several XLA compiler-option sets, alternating, on this machine.

    python benchmarks/train_options.py --dtype float32 --out opts.json \\
        --variants '{"ynn_dot": {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}}'

`hardware.train_compiler_options` chooses the step's XLA:CPU options from
measurements on the CPUs this project has run on (see its comments); a new
CPU can rank them differently. This times the step that `benchmarks/train.py`
times (the demo's model, 32 x 176 tokens or `--seq`, the same mesh) built with the
project's own options ("project") and with each variant, which replaces them
whole ({} = XLA's defaults), in alternating blocks: the fastest step of each
block, the best block per variant. No torch here: compare a variant with the
project's options, then measure the choice with `benchmarks/train.py`.

`--query_blocks 1000000,48` adds the project's step with the attention's
query blocks (`models.attention_core.QUERY_BLOCK`, read when the step is
traced) of other sizes: 1000000 is one block, the attention before 10c3d17.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run as a script from anywhere
import jax  # noqa: E402

from benchmarks.common import best_time, cpu_info, save  # noqa: E402
from benchmarks.train import BATCH, SEQ, demo_model, jax_step  # noqa: E402
from glore_jax import hardware  # noqa: E402
from glore_jax.models import attention_core  # noqa: E402


def build(cfg, options: dict | None, seq: int = SEQ, query_block: int | None = None):
    """A warmed-up step (its options `options`, or the project's own when None), its state and batch;
    with `query_block`, its attention traced with `attention_core.QUERY_BLOCK` set to that."""
    saved, saved_block = hardware.train_compiler_options, attention_core.QUERY_BLOCK
    if options is not None:  # read once, when the step is built
        hardware.train_compiler_options = lambda platform, dtype="float32": dict(options)
    attention_core.QUERY_BLOCK = query_block or saved_block  # read when the step is traced, below
    try:
        step, state, batch = jax_step(cfg, seq)
        hardware.train_compiler_options = saved
        state, m = step(state, batch)  # compiles: an option this XLA lacks fails here, in `main`'s try
        jax.block_until_ready(m["loss"])
    finally:
        hardware.train_compiler_options, attention_core.QUERY_BLOCK = saved, saved_block
    return step, state, batch


def main():
    hardware.reexec_with_launch_env()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--variants", default="{}", help='JSON {"name": {xla option: value}}')
    ap.add_argument("--query_blocks", default="", help="also the project's options with the attention's "
                    "query blocks of these sizes (comma-separated; 1000000 = one block, as before 10c3d17)")
    ap.add_argument("--seq", type=int, default=SEQ, help="tokens a row (the demo's refiners train at 256)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating blocks per variant")
    ap.add_argument("--repeats", type=int, default=5, help="timed steps per block")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    try:
        variants = {"project": None, **json.loads(args.variants)}
        blocks = {f"query_block={n}": int(n) for n in args.query_blocks.split(",") if n.strip()}
    except json.JSONDecodeError as e:
        sys.exit(f"train_options.py: --variants is not JSON: {e}")
    except ValueError as e:
        sys.exit(f"train_options.py: --query_blocks takes integers: {e}")
    cfg = demo_model().replace(dtype=args.dtype)
    built, errors = {}, {}
    for name, (options, block) in {**{n: (o, None) for n, o in variants.items()},
                                   **{n: (None, b) for n, b in blocks.items()}}.items():
        try:
            built[name] = build(cfg, options, args.seq, block)
        except Exception as e:  # noqa: BLE001 - an option this XLA lacks: report it, time the rest
            errors[name] = f"{type(e).__name__}: {str(e)[:300]}"
    states = {n: [b[1]] for n, b in built.items()}
    best = {n: float("inf") for n in built}
    for _ in range(args.rounds):
        for name, (step, _, batch) in built.items():
            def run(name=name, step=step, batch=batch):
                states[name][0], m = step(states[name][0], batch)
                jax.block_until_ready(m["loss"])
            best[name] = min(best[name], best_time(run, args.repeats))
    project = hardware.train_compiler_options(jax.devices()[0].platform, args.dtype)
    results = {**cpu_info(), "jax": jax.__version__, "devices": len(jax.devices()), "dtype": args.dtype,
               "batch": BATCH, "seq": args.seq, "project_options": project, "variants": {n: v for n, v in variants.items() if v is not None},
               "query_block": attention_core.QUERY_BLOCK, "query_block_variants": blocks,
               "step_s": best, "tokens_per_s": {n: BATCH * args.seq / t for n, t in best.items()},
               "speed_vs_project": {n: best["project"] / t for n, t in best.items()} if "project" in best else {},
               "errors": errors}
    print(f"{results['cpu']} ({results['cpu_count']} CPUs, {len(jax.devices())} devices), {args.dtype}; "
          f"project options {project}")
    for n, t in best.items():
        print(f"{n:>20}: {t * 1e3:8.2f} ms  {BATCH * args.seq / t:>9,.0f} tok/s  {results['speed_vs_project'].get(n, 0):.3f}x")
    for n, e in errors.items():
        print(f"{n:>20}: failed: {e}")
    save(results, args.out)


if __name__ == "__main__":
    main()
