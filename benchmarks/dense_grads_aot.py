"""The 16-bit dense backward's two forms in a TPU train step, compiled ahead of time on this machine.

    python benchmarks/dense_grads_aot.py --config=configs/gsm8k_llama2_7b.py --topology=v5p:2x2x2 \
        --layers 1 --out dense_grads_aot.json [--config.model.dtype=bfloat16 ...]

`benchmarks/dense_grads.py` times the two forms on a GPU or TPU; this asks XLA's
TPU compiler (libtpu, no TPU attached) what it makes of each, with the layers'
remat on and off: its FLOP count, its cost model's step time and the step's
memory. Why: when TPU and GPU went back to the plain form (4ef192c), the AOT
report's 7B step on v5p began counting ~18% more FLOPs, and no TPU was at hand
to time it. The program is the config's micro-batch train step (`grad_accum`
1) at `--layers` layers; deeper models scan their layers and XLA counts a scanned
layer once (`glore_jax.compile`), so compare FLOPs at 1 or 2 layers and memory
at any depth.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the TPU is described by libtpu, not attached
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run as a script from anywhere
import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from benchmarks.common import cpu_info, save  # noqa: E402
from benchmarks.dense_grads import FORMS  # noqa: E402
from glore_jax import compile as aot, objectives, sharding  # noqa: E402
from glore_jax.models import layers  # noqa: E402
from glore_jax.training import config as train_config  # noqa: E402


def compiled_step(exp, topology: str, layers_n: int, remat: bool, form: str):
    """XLA's cost and memory of the micro-batch train step of `exp` for `topology`, its backward in `form`."""
    mesh = sharding.make_mesh(exp.mesh, devices=aot.topology_devices(topology))
    obj = objectives.get(exp.objective, exp)
    model = exp.model.build(aot._vocab(exp)).replace(heads=obj.heads, num_layers=layers_n, remat=remat)
    micro = dataclasses.replace(exp, train=dataclasses.replace(
        exp.train, batch_size=exp.train.batch_size // exp.train.grad_accum, grad_accum=1))
    saved = layers._dense_grads  # looked up by name when traced (see benchmarks/dense_grads.py)
    layers._dense_grads = FORMS[form]
    try:
        compiled = aot._train_step(micro, obj, model, mesh)
    finally:
        layers._dense_grads = saved
    return {"cost": aot.cost(compiled), "memory": aot.memory(compiled)}


# --config, --topology and --out are `glore_jax.compile`'s own flags (defined when it is imported).
_CONFIG, _TOPOLOGY, _OUT = aot._CONFIG, aot._TOPOLOGY, aot._OUT
_LAYERS = flags.DEFINE_integer("layers", 1, "Layers of the compiled model.")
_REMAT = flags.DEFINE_list("remat", ["on", "off"], "Remat settings to compile: on, off.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    config = _CONFIG.value
    with config.unlocked():
        config.workdir = config.workdir or "aot-compile"  # nothing is written: the experiment needs a name
    exp = train_config.experiment(config)
    results = {**cpu_info(), "jax": jax.__version__, "config": config_flags.get_config_filename(flags.FLAGS["config"]),
               "topology": _TOPOLOGY.value, "layers": _LAYERS.value, "dtype": config.model.dtype,
               "micro_batch": exp.train.batch_size // exp.train.grad_accum, "seq_len": exp.data.max_len,
               "programs": {}}
    for remat in _REMAT.value:
        for form in FORMS:
            r = compiled_step(exp, _TOPOLOGY.value, _LAYERS.value, remat == "on", form)
            results["programs"][f"{form}_remat_{remat}"] = r
            c, m = r["cost"], r["memory"]
            print(f"remat {remat:>3}, {form:>5}: XLA {c['flops'] / 1e12:8.3f} TFLOP, cost model "
                  f"{c['optimal_seconds'] * 1e3:8.2f} ms, peak {m['peak'] / 2**30:6.2f} GiB "
                  f"(temporaries {m['temp'] / 2**30:6.2f})", flush=True)
    save(results, _OUT.value or None)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "topology"])
    app.run(main)
