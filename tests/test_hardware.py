"""The compute-dtype rule behind model.dtype="auto", its pinning per workdir, and the train step's XLA options."""

import json

import pytest

from glore_jax import hardware, pipeline
from glore_jax.training import config as train_config


@pytest.fixture
def flags(monkeypatch):
    def set_flags(values):
        monkeypatch.setattr(hardware, "cpu_bf16_flags", lambda: values)
        hardware.fastest_dtype.cache_clear()
    yield set_flags
    hardware.fastest_dtype.cache_clear()


def test_auto_is_bf16_only_with_amx_on_cpu(flags):
    flags(["amx_bf16", "avx512_bf16"])
    assert hardware.fastest_dtype() == "bfloat16"
    flags(["avx512_bf16"])
    assert hardware.fastest_dtype() == "float32"
    flags([])
    assert hardware.fastest_dtype() == "float32"
    assert hardware.train_compiler_options("cpu") == {"xla_cpu_experimental_ynn_fusion_type": ""}
    assert hardware.train_compiler_options("tpu") is None


def test_auto_resolves_at_the_edge_and_the_pipeline_pins_it(flags, tmp_path):
    c = train_config.base_config()
    c.workdir, c.model.dtype = str(tmp_path), "auto"
    flags(["amx_bf16"])
    assert dict(train_config.experiment(c).model.overrides)["dtype"] == "bfloat16"
    assert pipeline._pinned_dtype(str(tmp_path), "auto") == "bfloat16"
    flags([])  # a resumed run on another machine keeps the recorded choice
    assert pipeline._pinned_dtype(str(tmp_path), "auto") == "bfloat16"
    assert json.loads((tmp_path / "hardware.json").read_text())["dtype"] == "bfloat16"
    assert pipeline._pinned_dtype(str(tmp_path), "float32") == "float32"
    c.model.dtype = "float16"
    with pytest.raises(ValueError, match="model.dtype 'float16' unknown"):
        train_config.experiment(c)
