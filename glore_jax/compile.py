"""Will this config fit a TPU slice, and how fast would it run? AOT compilation for a topology, from any machine.

    python -m glore_jax.compile --config=configs/smoke.py --topology=v5e:2x2 [--config.k=v ...] [--out F.json]

The libtpu wheel (`pip install -e '.[tpu]'`) describes TPU topologies without
any TPU attached (`jax.experimental.topologies`), so XLA's TPU compiler can
lower the real train step (forward, backward, AdamW, grad accumulation) and
the sampler's prefill and decode loop, with the config's mesh and sharding
rules, for a slice you have not rented. Reported per device, from the
compiled executables:

  memory   arguments, outputs, temporaries and generated code; the peak
           (arguments + outputs - donated + temporaries + code) against the
           chip's HBM (`fits`);
  cost     XLA's FLOPs and its cost model's step time (`optimal_seconds`),
           and the MFU that implies for the model FLOPs (`flops_per_token`: 6N,
           N without the input embedding, + attention per token; every token of
           the batch counted as work).

These are the compiler's estimates, not measurements: a real pod's step
also pays the host, the input pipeline and collectives XLA models loosely.
For the decode loop XLA's cost counts one loop iteration (one token for
every row), not the whole loop.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from collections.abc import Callable
from typing import Any

from absl import app, flags
from ml_collections import config_flags

from glore_jax import cli
from glore_jax.errors import ConfigError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (e.g. configs/smoke.py).",
                                          lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", None, "TPU topology, e.g. v5e:2x2, v5p:4x4x4, v6e:4x4.")
_OUT = flags.DEFINE_string("out", "", "Also write the JSON here.")
_SAMPLER = flags.DEFINE_bool("sampler", True, "Also compile the sampler (prefill + decode loop) of an LM model.")

# HBM per chip, GiB (published figures), matched against device_kind like metrics._PEAK_TFLOPS.
# v5e reports "TPU v5 lite" and v5p plain "TPU v5", so the lite key comes first.
_HBM_GIB = (("v6", 32.0), ("v5 lite", 16.0), ("v5e", 16.0), ("v5", 95.0), ("v4", 32.0), ("v3", 16.0))
BATCH_DTYPES = {"tokens": "int32", "loss_mask": "float32", "step_end_mask": "float32", "step_labels": "float32",
                "segment_ids": "int32", "positions": "int32"}


def topology_devices(name: str) -> list:
    """The devices of a TPU topology (no TPU needed); a clear error without libtpu or for a bad name."""
    from jax.experimental import topologies
    # No TPU is opened, so several compiles (e.g. parallel tests) may share libtpu; without this the
    # second one fails on libtpu's single-process lockfile.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        return list(topologies.get_topology_desc(topology_name=name, platform="tpu").devices)
    except Exception as e:  # noqa: BLE001 - libtpu raises plain RuntimeErrors
        raise ConfigError(f"cannot describe TPU topology {name!r} ({str(e).splitlines()[0][:200]}); install the "
                         "`tpu` extra (libtpu) and use names like v5e:2x2, v5p:2x2x2, v6e:4x4") from None


def hbm_gib(kind: str) -> float | None:
    kind = kind.lower()
    return next((gib for key, gib in _HBM_GIB if key in kind), None)


def memory(compiled) -> dict[str, Any]:
    m = compiled.memory_analysis()
    out = {k: int(getattr(m, f"{k}_size_in_bytes")) for k in
           ("argument", "output", "alias", "temp", "generated_code")}
    out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"] + out["generated_code"]
    return out


def cost(compiled) -> dict[str, float]:
    c = compiled.cost_analysis()
    c = c[0] if isinstance(c, (list, tuple)) else c
    return {"flops": float(c.get("flops", 0.0)), "bytes_accessed": float(c.get("bytes accessed", 0.0)),
            "optimal_seconds": float(c.get("optimal_seconds", 0.0))}


def _with_shardings(tree, shardings):
    import jax
    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _vocab(exp) -> int:
    """The tokenizer's size without loading data: its file if present, else what the config implies."""
    from glore_jax.models import preset
    from glore_jax.tasks import GENERATED_TASKS
    from glore_jax.tokenizer import CONTROL_TOKENS, Tokenizer
    d = exp.data
    if d.tokenizer and os.path.isfile(d.tokenizer):
        return Tokenizer.load(d.tokenizer).vocab_size
    if not d.tokenizer and d.task in GENERATED_TASKS:
        return d.tokenizer_vocab_size + len(CONTROL_TOKENS)
    return preset(exp.model.preset).vocab_size + len(CONTROL_TOKENS)


def _train_step(exp, obj, model, mesh):
    """The compiled train step of `model` (forward, backward, AdamW, grad accumulation)."""
    import jax
    import numpy as np

    from glore_jax import sharding as shd
    from glore_jax.training import state as state_lib
    tx = state_lib.optimizer(exp.train)
    frozen = tuple(s.name for s in obj.frozen)
    shardings = state_lib.state_shardings(model, tx, mesh, frozen)
    state = _with_shardings(state_lib.abstract_state(model, tx, frozen), shardings)
    b, t = exp.train.batch_size, exp.data.max_len
    batch = {k: jax.ShapeDtypeStruct((b, t), np.dtype(v), sharding=shd.batch_sharding(mesh, 2))
             for k, v in BATCH_DTYPES.items()}
    step = state_lib.make_train_step(obj, model, tx, state_lib.schedule(exp.train), mesh, shardings,
                                     exp.train.grad_accum)
    return step.lower(state, batch).compile()


def _sampler(model, mesh, rows: int, prompt_len: int, max_new: int) -> dict[str, Any]:
    """The compiled prefill and decode loop (`Sampler.advance_program`) of one group of `rows` (`group_size`).

    The decode state is at its largest: one phase, the whole suffix.
    """
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from glore_jax import sharding as shd
    from glore_jax.models import abstract_params
    from glore_jax.sampling import Sampler, StopCondition
    from glore_jax.sampling.strategy import SamplingStrategy
    sampler = Sampler(model, mesh=mesh, decode_phases=1)
    rows = sampler.group_size(rows)  # the rows one loop decodes at a time (groups on a per-core CPU host)
    # The decode layout: a small model's weights are replicated on every device (see `Sampler`).
    params = _with_shardings(nn.unbox(abstract_params(model)), sampler.param_shardings)
    sds = lambda shape, dtype, sharding: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)  # noqa: E731
    prompts, lengths = sds((rows, prompt_len), jnp.int32, sampler._rows2), sds((rows,), jnp.int32, sampler._row)
    prefill = sampler.prefill.lower(params, prompts, lengths).compile()
    prefix, logits = _with_shardings(jax.eval_shape(sampler._prefill, params, prompts, lengths),
                                     prefill.output_shardings)
    weights = sampler.weights.lower(params).compile()  # the decode layout of the params (split per layer)
    decode_params, layers = _with_shardings(jax.eval_shape(sampler.weights, params), weights.output_shardings)
    strategy, stop = SamplingStrategy(temperature=1.0), StopCondition(eos_id=0)
    scalar = lambda dtype: sds((), dtype, shd.replicated(mesh))  # noqa: E731
    arrays = (logits, lengths, sds((rows,), jnp.int32, sampler._row), scalar(jnp.uint32), scalar(jnp.int32))
    static = (max_new, 1, max_new - 1, strategy, stop)  # one decode phase: the suffix at its largest
    start = sampler.start.lower(*arrays, *static).compile()
    state = _with_shardings(jax.eval_shape(lambda *a: sampler._start(*a, *static), *arrays),
                            start.output_shardings)
    loop = sampler.advance_program(rows)  # the program a call of `rows` rows runs (its per-core form for few)
    return {"prefill": prefill, "decode_loop": loop.lower(decode_params, layers, prefix, state, strategy, stop).compile()}


def _depth_cost(compiled_at: Callable[[int], Any], layers: int) -> dict[str, float]:
    """XLA's cost of the full-depth program, extrapolated from 1- and 2-layer compiles (`compiled_at(n)`).

    Deep models scan their layers (a while loop), and XLA's cost analysis
    counts a loop body once, so a 32-layer model would read as about one
    layer. Models of up to 8 layers are unrolled (`models.transformer`), so
    cost(L) = cost(1) + (L - 1) * (cost(2) - cost(1)) is exact up to fusion.
    """
    one, two = (cost(compiled_at(n)) for n in (1, 2))
    # A second layer that costs less than nothing means XLA's cost model is not linear in depth.
    # v5e's cost model returns negative step times, even for one layer: those are no estimate at all.
    out = {k: one[k] + (layers - 1) * (two[k] - one[k]) if two[k] >= one[k] >= 0 else None for k in one}
    out["layers_1"], out["layers_2"] = one, two
    return out


def report(config, topology: str, *, sampler: bool = True) -> dict[str, Any]:
    from glore_jax import objectives, sharding
    from glore_jax.training import config as train_config
    from glore_jax.training.metrics import peak_tflops
    if not config.workdir:  # nothing is written: the experiment only needs a name
        config = copy.deepcopy(config)
        with config.unlocked():
            config.workdir = "aot-compile"
    exp = train_config.experiment(config)
    devices = topology_devices(topology)
    mesh = sharding.make_mesh(exp.mesh, devices=devices)
    kind = devices[0].device_kind
    hbm = hbm_gib(kind)
    peak = peak_tflops(0.0, devices[0]) * 1e12
    obj = objectives.get(exp.objective, exp)
    if obj.experience is not None:
        raise ConfigError(f"objective {exp.objective!r} builds its batches from rollouts; AOT compile covers the "
                          "offline objectives (sft, orm, sorm, ...): compile those stages of the config")
    model = exp.model.build(_vocab(exp)).replace(heads=obj.heads)
    b, t, n = exp.train.batch_size, exp.data.max_len, len(devices)
    train: dict[str, Any] = {"batch": b, "seq_len": t, "grad_accum": exp.train.grad_accum,
                             "params": model.num_params(), "model_flops": model.flops_per_token(t) * b * t}
    full = _unless_over_hbm(lambda: _train_step(exp, obj, model, mesh), train)
    if full is not None:
        # Gradient accumulation is a loop too, counted once: cost one micro-batch step, times the count
        # (the optimizer update, counted that many times, is ~1e-4 of the step's FLOPs).
        accum = exp.train.grad_accum
        micro = dataclasses.replace(exp, train=dataclasses.replace(exp.train, batch_size=b // accum, grad_accum=1))
        per_micro = _depth_cost(lambda layers: _train_step(micro, obj, model.replace(num_layers=layers), mesh),
                                model.num_layers)
        step_cost = {k: v * accum if isinstance(v, float) else v for k, v in per_micro.items()}
        train = _fit({**train, "memory": memory(full), "cost": step_cost}, hbm)
        seconds = train["cost"]["optimal_seconds"] or 0.0
        train["estimated_step_seconds"] = seconds or None
        train["estimated_mfu"] = train["model_flops"] / (n * peak * seconds) if seconds > 0 else None
        train["tokens_per_second_per_chip"] = b * t / seconds / n if seconds > 0 else None
    out: dict[str, Any] = {"topology": topology, "device_kind": kind, "chips": n, "mesh": dict(mesh.shape),
                           "objective": exp.objective, "model": dataclasses.asdict(model), "hbm_gib_per_chip": hbm,
                           "peak_tflops_per_chip": peak / 1e12, "train_step": train,
                           "cost_method": "XLA cost analysis, extrapolated in depth from 1- and 2-layer compiles"}
    if sampler and "lm" in model.heads:
        g = config.get("glore")
        policy = model.replace(heads=("lm",))
        m = int(mesh.shape["data"] * mesh.shape["fsdp"])
        rows = -(-(int(g.sample_rows) if g else b) // m) * m
        prompt_len = int(g.max_prompt_len) if g else t // 2
        max_new = int(g.max_new_tokens) if g else t // 2
        out["sampler"] = {"rows": rows, "prompt_len": prompt_len, "max_new": max_new}
        at = lambda layers: _sampler(policy.replace(num_layers=layers), mesh, rows, prompt_len, max_new)  # noqa: E731
        full = _unless_over_hbm(lambda: at(policy.num_layers), out["sampler"])
        if full is not None:
            small = {1: at(1), 2: at(2)}
            for part, key in (("prefill", "cost"), ("decode_loop", "cost_per_token")):
                depth = _depth_cost(lambda layers, part=part: small[layers][part], policy.num_layers)
                out["sampler"][part] = _fit({"memory": memory(full[part]), key: depth}, hbm)
    return out


def _unless_over_hbm(compile_fn: Callable[[], Any], entry: dict[str, Any]) -> Any:
    """compile_fn(), or None with `fits: false` and XLA's message in `entry` when XLA refuses it as over HBM."""
    try:
        return compile_fn()
    except Exception as e:  # noqa: BLE001 - XLA:TPU refuses a program over HBM at compile time
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        entry.update(fits=False, error=str(e).splitlines()[0][:400])
        return None


def _fit(entry: dict[str, Any], hbm: float | None) -> dict[str, Any]:
    entry["peak_gib"] = entry["memory"]["peak"] / 2**30
    entry["fits"] = None if hbm is None else entry["peak_gib"] <= hbm
    return entry


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    result = report(_CONFIG.value, _TOPOLOGY.value, sampler=_SAMPLER.value)
    text = json.dumps(result, indent=2, default=float)
    print(text)
    if _OUT.value:
        from glore_jax import files
        files.write_atomic(_OUT.value, text + "\n")


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "topology"])
    cli.main(main)
