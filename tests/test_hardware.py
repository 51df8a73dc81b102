"""The compute-dtype rule behind model.dtype="auto", its pinning per workdir, and the train step's XLA options."""

import json

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
    assert hardware.train_compiler_options("cpu") == {"xla_cpu_experimental_ynn_fusion_type": ""}
    assert hardware.train_compiler_options("tpu") is None


def test_auto_resolves_at_the_edge_and_the_pipeline_pins_it(chosen, tmp_path):
    c = train_config.base_config()
    c.workdir, c.model.dtype = str(tmp_path), "auto"
    chosen("bfloat16")
    assert dict(train_config.experiment(c).model.overrides)["dtype"] == "bfloat16"
    assert pipeline._pinned_dtype(str(tmp_path), "auto") == "bfloat16"
    chosen("float32")  # a resumed run on another machine keeps the recorded choice
    assert pipeline._pinned_dtype(str(tmp_path), "auto") == "bfloat16"
    assert json.loads((tmp_path / "hardware.json").read_text())["dtype"] == "bfloat16"
    assert pipeline._pinned_dtype(str(tmp_path), "float32") == "float32"
    c.model.dtype = "float16"
    with pytest.raises(ValueError, match="model.dtype 'float16' unknown"):
        train_config.experiment(c)
