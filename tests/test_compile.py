"""`python -m glore_jax.compile`: AOT fit-and-cost report for a TPU topology, compiled on this CPU by libtpu."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                reason="needs the `tpu` extra (libtpu) to describe TPU topologies")


def _compile(*args):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "glore_jax.compile", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_smoke_config_on_v5e_2x2_reports_memory_and_cost(tmp_path):
    out = tmp_path / "aot.json"
    proc = _compile("--config=configs/smoke.py", "--topology=v5e:2x2", f"--out={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert json.loads(proc.stdout[proc.stdout.index("{"):]) == report  # printed and saved alike
    assert (report["chips"], report["device_kind"], report["hbm_gib_per_chip"]) == (4, "TPU v5 lite", 16.0)
    assert report["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    train = report["train_step"]
    mem = train["memory"]
    # The donated state comes back as the output: f32 params + 2 Adam moments (12 bytes per param), each
    # device holding between a quarter (all split by fsdp) and all of it (tiny dims stay replicated).
    state_bytes = 12 * train["params"]
    assert state_bytes / 4 <= mem["alias"] <= state_bytes
    assert mem["peak"] == mem["argument"] + mem["output"] - mem["alias"] + mem["temp"] + mem["generated_code"]
    assert train["fits"] is True and 0 < train["peak_gib"] < 0.1
    # XLA's per-device FLOPs times 4 devices is the same order as the model FLOPs (`flops_per_token`).
    assert 0.3 < 4 * train["cost"]["flops"] / train["model_flops"] < 3
    assert train["estimated_step_seconds"] > 0 and 0 < train["estimated_mfu"] < 1
    sampler = report["sampler"]
    assert sampler["rows"] % 4 == 0 and sampler["decode_loop"]["fits"] is True
    assert sampler["decode_loop"]["memory"]["alias"] > 0  # the decode state is donated, updated in place
    assert sampler["prefill"]["cost"]["flops"] > sampler["decode_loop"]["cost_per_token"]["flops"] > 0


def test_unknown_topology_is_one_error_line():
    proc = _compile("--config=configs/smoke.py", "--topology=v9z:7x7")
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "v9z:7x7" in errors[0], proc.stderr[-2000:]


def test_dense_grads_aot_compiles_each_backward_form_with_remat_as_asked(tmp_path):
    """benchmarks/dense_grads_aot.py: the README's table of the two 16-bit backward forms under the TPU
    compiler. Each form's remat program recomputes (more FLOPs than without remat), and the two forms are
    two programs (the swap of `layers._dense_grads` reaches the trace)."""
    out = tmp_path / "forms.json"
    proc = subprocess.run([sys.executable, "benchmarks/dense_grads_aot.py", "--config=configs/smoke.py",
                           "--topology=v5e:2x2", "--config.model.dtype=bfloat16", f"--out={out}"], cwd=ROOT,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    programs = json.loads(out.read_text())["programs"]
    assert sorted(programs) == ["plain_remat_off", "plain_remat_on", "views_remat_off", "views_remat_on"]
    flops = {name: p["cost"]["flops"] for name, p in programs.items()}
    for form in ("plain", "views"):
        assert flops[f"{form}_remat_on"] > 1.05 * flops[f"{form}_remat_off"] > 0
        assert programs[f"{form}_remat_on"]["memory"]["peak"] > 0
    assert flops["plain_remat_off"] != flops["views_remat_off"]
