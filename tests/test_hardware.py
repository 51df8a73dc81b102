"""The compute-dtype rule behind model.dtype="auto", its pinning per workdir, and the train step's XLA options."""

import json
import os
import subprocess
import sys

import jax
import pytest

from glore_jax import hardware, pipeline
from glore_jax.training import config as train_config


@pytest.fixture
def chosen(monkeypatch):
    """Makes this machine's rule answer `dtype`, as on another kind of machine."""
    def set_dtype(dtype):
        monkeypatch.setattr(hardware, "fastest_dtype", lambda: dtype)
    return set_dtype


def test_auto_is_bf16_on_accelerators_and_f32_on_every_cpu():
    assert hardware.dtype_for("tpu") == hardware.dtype_for("gpu") == "bfloat16"
    assert hardware.dtype_for("cpu") == "float32"
    assert hardware.fastest_dtype() == "float32"  # the tests run on CPU, AMX or not
    assert hardware.train_compiler_options("cpu") is None  # XLA's defaults: YNNPACK dots and reductions
    assert hardware.train_compiler_options("tpu") is None


def test_bf16_training_uses_ynnpack_only_where_the_cpu_multiplies_bf16(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_bf16_flags", lambda: ["avx512_bf16"])
    assert hardware.train_compiler_options("cpu", "bfloat16") is None
    assert hardware.train_compiler_options("cpu", "float32") is None
    monkeypatch.setattr(hardware, "cpu_bf16_flags", lambda: [])  # AVX2 only: bf16 is emulated anyway
    assert hardware.train_compiler_options("cpu", "bfloat16") == {"xla_cpu_experimental_ynn_fusion_type": ""}
    assert hardware.train_compiler_options("gpu", "bfloat16") is None


def test_auto_resolves_at_the_edge_and_the_pipeline_pins_it(chosen, tmp_path):
    c = train_config.base_config()
    c.workdir, c.model.dtype = str(tmp_path), "auto"
    chosen("bfloat16")
    assert dict(train_config.experiment(c).model.overrides)["dtype"] == "bfloat16"
    assert pipeline._pin_hardware(str(tmp_path), "auto") == "bfloat16"
    chosen("float32")  # a resumed run on another machine keeps the recorded choice
    assert pipeline._pin_hardware(str(tmp_path), "auto") == "bfloat16"
    assert json.loads((tmp_path / "hardware.json").read_text())["dtype"] == "bfloat16"
    assert pipeline._pin_hardware(str(tmp_path), "float32") == "float32"
    assert json.loads((tmp_path / "hardware.json").read_text())["devices"] == jax.device_count()
    c.model.dtype = "float16"
    with pytest.raises(ValueError, match="model.dtype 'float16' unknown"):
        train_config.experiment(c)


def test_malloc_env_adds_the_tunable_once_and_keeps_the_users_own():
    assert hardware.malloc_env({"A": "1"}) == {"A": "1", "GLIBC_TUNABLES": hardware.MALLOC_TUNABLE}
    other = {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}
    assert hardware.malloc_env(other)["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=2:{hardware.MALLOC_TUNABLE}"
    assert hardware.malloc_env({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) is None  # the user's choice stands
    assert hardware.malloc_env(hardware.malloc_env({})) is None  # a restarted process does not restart again


def test_cpu_devices_env_defaults_to_two_on_a_multicore_host_names_the_count_once_and_rejects_a_bad_count():
    flag = "--xla_force_host_platform_device_count"
    assert hardware.cpu_devices_env({"A": "1"}, cpus=2)["XLA_FLAGS"] == f"{flag}=2"  # unset: the default
    assert hardware.cpu_devices_env({"A": "1"}, cpus=16)["XLA_FLAGS"] == f"{flag}=2"  # measured on 2 cores only
    assert hardware.cpu_devices_env({"A": "1"}, cpus=1) is None  # one core: XLA's own single device
    assert hardware.cpu_devices_env({"GLORE_JAX_CPU_DEVICES": "1"}, cpus=2) is None  # the opt-out
    assert hardware.cpu_devices_env({"GLORE_JAX_CPU_DEVICES": "4"}, cpus=2)["XLA_FLAGS"] == f"{flag}=4"
    env = hardware.cpu_devices_env({"GLORE_JAX_CPU_DEVICES": "2", "XLA_FLAGS": "--xla_cpu_enable_fast_math=false"})
    assert env["XLA_FLAGS"] == f"--xla_cpu_enable_fast_math=false {flag}=2"
    assert hardware.cpu_devices_env(env) is None  # a restarted process does not restart again
    # A count named already (a test harness's 8) stands.
    assert hardware.cpu_devices_env({"GLORE_JAX_CPU_DEVICES": "2", "XLA_FLAGS": f"{flag}=8"}) is None
    assert hardware.cpu_devices_env({"XLA_FLAGS": f"{flag}=8"}, cpus=2) is None
    for bad in ("0", "two", "-1"):
        with pytest.raises(ValueError, match="GLORE_JAX_CPU_DEVICES must be a positive integer"):
            hardware.cpu_devices_env({"GLORE_JAX_CPU_DEVICES": bad})
    both = hardware.launch_env({"GLORE_JAX_CPU_DEVICES": "2"})
    assert both["GLIBC_TUNABLES"] == hardware.MALLOC_TUNABLE
    assert both["XLA_FLAGS"] == "--xla_force_host_platform_device_count=2"
    assert hardware.launch_env(both) is None


def test_a_workdir_resumed_on_another_device_count_is_warned(tmp_path, capsys):
    assert pipeline._pin_hardware(str(tmp_path / "same"), "float32") == "float32"
    assert pipeline._pin_hardware(str(tmp_path / "same"), "float32") == "float32"
    assert "WARNING" not in capsys.readouterr().out
    (tmp_path / "hardware.json").write_text(json.dumps({"dtype": "float32", "devices": jax.device_count() + 1}))
    pipeline._pin_hardware(str(tmp_path), "auto")
    out = capsys.readouterr().out
    assert f"started on {jax.device_count() + 1} XLA device(s) and resumes on {jax.device_count()}" in out, out


def test_a_command_line_builds_its_mesh_over_two_cpu_devices_unless_asked_for_one():
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "GLIBC_TUNABLES", "GLORE_JAX_CPU_DEVICES")}
    code = ("from glore_jax import hardware; hardware.reexec_with_launch_env(); import jax; "
            "from glore_jax import sharding; print('mesh', dict(sharding.make_mesh().shape))")
    default = 2 if os.cpu_count() >= 2 else 1  # the default on a multi-core host
    lines = _run_reexec(code, {**env, "JAX_PLATFORMS": "cpu"})
    assert lines == [f"mesh {{'data': 1, 'fsdp': {default}, 'tensor': 1}}"], lines
    lines = _run_reexec(code, {**env, "GLORE_JAX_CPU_DEVICES": "1", "JAX_PLATFORMS": "cpu"})
    assert lines == ["mesh {'data': 1, 'fsdp': 1, 'tensor': 1}"], lines


def _run_reexec(code: str, env: dict) -> list[str]:
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


def test_command_lines_restart_once_with_the_tunable_and_keep_their_pid_and_arguments():
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    code = ("import os, sys; print('start', os.getpid(), flush=True); from glore_jax import hardware; "
            "hardware.reexec_with_launch_env(); print('after', os.getpid(), os.environ.get('GLIBC_TUNABLES'), "
            "sys.executable)")
    lines = _run_reexec(code, env)
    # Two starts (the original and the restart), one run past the restart, under the same PID and interpreter.
    starts = [line.split()[1] for line in lines if line.startswith("start")]
    after = [line.split() for line in lines if line.startswith("after")]
    assert len(starts) == 2 and starts[0] == starts[1], lines
    assert len(after) == 1 and after[0][1] == starts[0] and after[0][2] == hardware.MALLOC_TUNABLE, lines
    assert after[0][3] == sys.executable
    # Opted out: no restart.
    lines = _run_reexec(code, {**env, "GLORE_JAX_NO_REEXEC": "1"})
    assert [line.split()[0] for line in lines] == ["start", "after"] and lines[1].split()[2] == "None", lines


def test_python_m_glore_jax_restarts_with_the_tunable_before_reading_its_config(tmp_path):
    # A config file runs at flag parsing, after the restart: it sees the environment the job runs in.
    config = tmp_path / "probe.py"
    config.write_text("import os\nprint('probe', os.environ.get('GLIBC_TUNABLES'), flush=True)\n"
                      "raise SystemExit(0)\n")
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    out = subprocess.run([sys.executable, "-m", "glore_jax.train", f"--config={config}"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert [line for line in out.stdout.splitlines() if line.startswith("probe")] == \
        [f"probe {hardware.MALLOC_TUNABLE}"], (out.stdout, out.stderr)


def test_cli_main_called_from_another_program_never_restarts_it(monkeypatch):
    from glore_jax import cli
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.setattr(os, "execve", lambda *a: (_ for _ in ()).throw(AssertionError("restarted the caller")))
    monkeypatch.setattr(sys, "argv", ["caller"])
    ran = []
    try:
        cli.main(lambda argv: ran.append(argv))
    except SystemExit as e:
        assert not e.code
    assert ran == [["caller"]]
