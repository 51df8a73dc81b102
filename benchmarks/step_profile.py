"""Where a train step's time goes: XLA's kernels, and the torch peer's operators, on the same batch.

    python benchmarks/step_profile.py --dtype float32 --torch --out profile.json
    GLORE_JAX_CPU_DEVICES=1 python benchmarks/step_profile.py   # one XLA device: no waits between devices

The step is `benchmarks/train.py`'s (the demo's model, 32 x 176 tokens, the
trainer's mesh and XLA options). JAX's side is traced with `jax.profiler`
and each kernel's time summed from the trace, by kind (matmuls, XLA's
elementwise fusions, reduce-windows, collectives, ...) and by the model code
it came from (the HLO's `op_name`); torch's side is `torch.profiler`'s
self time per operator. The trace costs time itself, so compare shares, not
these totals with `benchmarks/train.py`'s step times. On a CPU host split into
several XLA devices, a kernel's time includes waiting for the shared thread
pool, and collectives include waiting for the other device: one device
(GLORE_JAX_CPU_DEVICES=1) attributes time more cleanly. Library fusions
(YNNPACK's, XLA's default on CPU since 7c81038) run on a thread pool of their
own, and their spans include its waits: on the Zen 5, one device, they made
the traced kernel total 184 ms a step against 129 with them off, while the
untraced step was 4.6% faster with them (`train_options.py`). Compare kinds
within one option set, not across.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import pathlib
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run as a script from anywhere
import jax  # noqa: E402

from benchmarks.common import cpu_info, save, torch_setup  # noqa: E402
from benchmarks.train import _batch, demo_model, torch_train_step  # noqa: E402
from benchmarks.train_options import build  # noqa: E402
from glore_jax import hardware, models as M  # noqa: E402

# Trace events that are not kernels: the runtime's own spans, which contain the kernels.
_NOT_KERNELS = ("ThunkExecutor", "$", "PjitFunction", "CommonPjRt", "Wait", "Handle inputs", "ParseArguments",
                "MutexLock", "InvokeRendezvous", "Rendezvous", "end:", "AllocateOutputBuffers", "PythonRefManager",
                "ThreadpoolListener")
_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


def kind_of(kernel: str, custom: set[str], code: str = "") -> str:
    """A kernel's kind from its HLO name (`custom`: the library fusions, e.g. YNNPACK's; `code`: the model
    code it came from, the HLO's op_name, which tells a library fusion's dots from its reductions)."""
    base = re.sub(r"\.\d+$", "", kernel).removeprefix("wrapped_")
    if base.startswith(_COLLECTIVES):
        return "collective (incl. waiting)"
    if kernel in custom:
        return "library matmul" if "dot_general" in code else "library reduction or other"
    if base.startswith(("dot", "convolution")):
        return "matmul"
    if "reduce-window" in base:
        return "reduce-window"
    if "fusion" in base:
        return "elementwise fusion"
    return base


def part_of(code: str) -> str:
    """The part of the step a kernel's model code (its HLO op_name) belongs to; backward kernels carry
    their forward op's name under `transpose(...)`, so each part counts its forward and backward."""
    if "norm" in code:
        return "norms"
    if "/attn/" in code:
        return "attention (its projections included)"
    if "/mlp/" in code:
        return "MLP"
    if "lm_head" in code:
        return "LM head"
    if "jvp(" in code or "transpose(" in code:
        return "other model code (embedding, loss)"
    return "optimizer, clipping and the rest"


def jax_profile(cfg: M.ModelConfig, steps: int, top: int) -> dict:
    step, state, batch = build(cfg, None)
    hlo = step.lower(state, batch).compile().as_text()
    where = dict(re.findall(r'%([\w.-]+) = [^\n]*?op_name="([^"]+)"', hlo))  # kernel -> model code
    custom = set(re.findall(r"%([\w.-]+) = [^\n]*kind=kCustom", hlo))
    for _ in range(2):
        state, m = step(state, batch)
    jax.block_until_ready(m["loss"])
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            for _ in range(steps):
                state, m = step(state, batch)
            jax.block_until_ready(m["loss"])
        trace = json.load(gzip.open(glob.glob(f"{d}/**/*perfetto_trace.json.gz", recursive=True)[0]))
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    per = steps * len(jax.devices())  # ms a step and a device
    kernels: collections.Counter = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and not re.sub(r"^\[\d+\] ", "", e["name"]).startswith(_NOT_KERNELS):
            kernels[e["name"]] += e.get("dur", 0) / 1e3 / per
    kinds: collections.Counter = collections.Counter()
    parts: collections.Counter = collections.Counter()
    for k, ms in kernels.items():
        kinds[kind_of(k, custom, where.get(k, ""))] += ms
        if k in where:  # a kernel of the program, not a runtime span
            parts[part_of(where[k])] += ms
    return {"ms_per_step_device": sum(kernels.values()), "by_kind": dict(kinds.most_common()),
            "by_part": dict(parts.most_common()),
            "top": [{"kernel": k, "ms": ms, "kind": kind_of(k, custom, where.get(k, "")), "code": where.get(k, "")}
                    for k, ms in kernels.most_common(top)]}


def _torch_worker(job: str) -> None:
    import torch
    job = json.loads(job)
    sync = torch_setup(torch, "cpu")
    tokens = torch.tensor(_batch(M.ModelConfig.from_dict(job["cfg"]))["tokens"], dtype=torch.long)
    step = torch_train_step(torch, job["cfg"], tokens, job["dtype"], "eager", "cpu", sync)
    for _ in range(2):
        step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(job["steps"]):
            step()
    rows = [(e.key, e.self_cpu_time_total / 1e3 / job["steps"]) for e in prof.key_averages()]
    rows.sort(key=lambda r: -r[1])
    print(json.dumps({"ms_per_step": sum(ms for _, ms in rows), "top": [{"op": k, "ms": ms} for k, ms in rows]}))


def torch_profile(cfg: M.ModelConfig, dtype: str, steps: int, top: int) -> dict:
    job = json.dumps({"cfg": json.loads(cfg.to_json()), "dtype": dtype, "steps": steps})
    out = subprocess.run([sys.executable, __file__, "--torch_worker", job], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"torch worker failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["top"] = result["top"][:top]
    return result


def main():
    hardware.reexec_with_launch_env()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--steps", type=int, default=3, help="steps traced")
    ap.add_argument("--top", type=int, default=25, help="kernels / operators listed")
    ap.add_argument("--torch", action="store_true", help="also profile the torch eager peer (a child process)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--torch_worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.torch_worker:
        return _torch_worker(args.torch_worker)
    if jax.devices()[0].platform != "cpu":
        sys.exit("step_profile.py: profiles XLA:CPU (its kernel names); on an accelerator use jax.profiler and xprof")
    cfg = demo_model().replace(dtype=args.dtype)
    results = {**cpu_info(), "jax": jax.__version__, "devices": len(jax.devices()), "dtype": args.dtype,
               "jax_profile": jax_profile(cfg, args.steps, args.top)}
    if args.torch:
        results["torch_profile"] = torch_profile(cfg, args.dtype, args.steps, args.top)
    p = results["jax_profile"]
    print(f"{results['cpu']} ({results['cpu_count']} CPUs, {results['devices']} XLA devices), {args.dtype}; "
          f"JAX kernels {p['ms_per_step_device']:.1f} ms a step and device (traced)")
    for kind, ms in p["by_kind"].items():
        print(f"  {ms:8.2f} ms  {kind}")
    print("  by part of the step:")
    for part, ms in p["by_part"].items():
        print(f"  {ms:8.2f} ms  {part}")
    for r in p["top"]:
        print(f"  {r['ms']:8.2f} ms  {r['kernel'][:40]:40s} {r['kind'][:18]:18s} {r['code'][-60:]}")
    if args.torch:
        t = results["torch_profile"]
        print(f"torch eager: operators' self time {t['ms_per_step']:.1f} ms a step (traced)")
        for r in t["top"]:
            print(f"  {r['ms']:8.2f} ms  {r['op']}")
    save(results, args.out)


if __name__ == "__main__":
    main()
