"""The 16-bit dense backward in its two forms, in a bf16 train step on this machine's first JAX device.

    python benchmarks/dense_grads.py --preset llama2_7b --layers 2 --out dense_grads.json

`models.layers.dense` multiplies 16-bit operands with a custom backward that
picks its products per platform: plain `g @ w.T` and `x.T @ g` on TPU and GPU,
the same products through 3-D views on CPU (XLA:CPU's YNNPACK dots take no
transposed operand). When TPU and GPU went back to the plain form (4ef192c),
the AOT compile of LLaMA-2 7B for v5p began counting ~18% more step FLOPs and
estimating an 8% slower step, while the two products alone were estimated
faster plain: a question for real hardware (`benchmarks/dense_grads_aot.py` shows
what the TPU compiler makes of each form, remat on and off). This builds the trainer's step
twice, once with each form, and alternates timing them (fastest of each
block, best block per form), with XLA's FLOP count for each compiled step.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run as a script from anywhere
import jax  # noqa: E402

from benchmarks.common import best_time, cpu_info, save  # noqa: E402
from benchmarks.train import BATCH, SEQ, demo_model, jax_step  # noqa: E402
from glore_jax import hardware, models as M  # noqa: E402
from glore_jax.models import layers  # noqa: E402

FORMS = {"plain": layers._dense_grads, "views": layers._dense_grads_cpu}


def build(cfg: M.ModelConfig, form: str):
    """A compiled step whose backward uses `form` on every platform, its state and batch, and XLA's FLOPs."""
    step, state, batch = jax_step(cfg)
    # `_dense_16bit_bwd` looks the default branch up by name when traced: swap it for this trace only.
    saved = layers._dense_grads
    layers._dense_grads = FORMS[form]
    try:
        compiled = step.lower(state, batch).compile()
    finally:
        layers._dense_grads = saved
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return compiled, state, batch, float(cost.get("flops", 0.0))


def main():
    hardware.reexec_with_launch_env()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default=None, help="a `models` preset (default: the demo's model)")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=3, help="alternating blocks per form")
    ap.add_argument("--repeats", type=int, default=5, help="timed steps per block")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if jax.devices()[0].platform == "cpu":
        sys.exit("dense_grads.py: on a CPU the backward always takes the 3-D views; run it on a TPU or GPU")
    cfg = M.preset(args.preset) if args.preset else demo_model()
    cfg = (cfg.replace(num_layers=args.layers) if args.layers else cfg).replace(dtype="bfloat16")
    built = {f: build(cfg, f) for f in FORMS}
    holders = {f: [b[1]] for f, b in built.items()}
    best = {f: float("inf") for f in FORMS}
    for _ in range(args.rounds):
        for f, (compiled, _, batch, _) in built.items():
            def run(f=f, compiled=compiled, batch=batch):
                holders[f][0], m = compiled(holders[f][0], batch)
                jax.block_until_ready(m["loss"])
            best[f] = min(best[f], best_time(run, args.repeats))
    device = jax.devices()[0]
    results = {**cpu_info(), "jax": jax.__version__, "device_kind": device.device_kind, "devices": len(jax.devices()),
               "params_m": cfg.num_params() / 1e6, "batch": BATCH, "seq": SEQ,
               "step_s": best, "xla_flops": {f: b[3] for f, b in built.items()},
               "plain_speedup_over_views": best["views"] / best["plain"]}
    print(f"{device.device_kind}: {results['params_m']:.0f}M params, bf16, batch {BATCH} x {SEQ}")
    for f in FORMS:
        print(f"{f:>6}: step {best[f] * 1e3:8.2f} ms, XLA counts {results['xla_flops'][f] / 1e12:8.3f} TFLOP")
    print(f"plain / views speed: {results['plain_speedup_over_views']:.3f}x")
    save(results, args.out)


if __name__ == "__main__":
    main()
