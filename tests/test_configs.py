"""Every experiment config builds, for every stage, with the pipeline knobs the recipe reads."""

import importlib.util
import pathlib

import pytest

from glore_jax.recipe.config import TRAINED_STAGES, glore_knobs

CONFIGS = sorted((pathlib.Path(__file__).resolve().parents[1] / "configs").glob("*.py"))


def _load(path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_builds_every_stage_with_every_knob(path):
    module = _load(path)
    for stage in TRAINED_STAGES:
        c = module.get_config(stage)
        assert c.objective == TRAINED_STAGES[stage][0]
        assert set(c.glore) == set(glore_knobs())
        assert c.train.total_steps == c.stages[stage].total_steps > 0
    with pytest.raises(ValueError, match="unknown stage"):
        module.get_config("nope")


def test_gsm8k_presets_keep_the_papers_sampling_budget():
    for name in ("gsm8k_llama2_7b", "gsm8k_llama2_13b"):
        g = _load(next(p for p in CONFIGS if p.stem == name)).get_config().glore
        assert (g.ei_k, g.sorm_k, g.ei_from_base, g.reference_fallback) == (96, 8, True, False)
