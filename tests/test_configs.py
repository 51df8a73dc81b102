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


def test_value_model_wiring_follows_the_knobs():
    """The SORM starts from the model `glore.sorm_init` names; with `glore.rerank_orm` the gate and the
    rerank read the fine-tuned ORM while value_eval still compares the ORM the SORM is measured against."""
    from glore_jax.errors import ConfigError
    from glore_jax.recipe.config import GloreConfig
    from glore_jax.recipe.table import stage_table
    base = _load(next(p for p in CONFIGS if p.stem == "smoke")).get_config().glore.to_dict()

    def table(**knobs):
        stages, aliases = stage_table(GloreConfig(**{**base, **knobs}))
        return {s.name: s for s in stages}, aliases

    stages, aliases = table(sorm_init="orm", rerank_orm=False, joint_refiner=True)
    assert "refiner" in stages and "global_refiner" not in stages and "local_refiner" not in stages
    assert aliases["global_refiner"] == aliases["local_refiner"] == "refiner"
    assert "refiner_records.jsonl" in stages["refiner"].reads and "refiner_records.jsonl" in stages["refine_data"].writes
    assert "orm" in stages["sorm"].reads and "policy_final" not in stages["sorm"].reads
    assert aliases["orm_final"] == "orm" and "rerank_orm" not in stages
    stages, aliases = table(sorm_init="policy", rerank_orm=True, joint_refiner=False)
    assert "global_refiner" in stages and "refiner" not in stages and "global_refiner" not in aliases
    assert "refiner_records.jsonl" not in stages["refine_data"].writes
    assert "policy_final" in stages["sorm"].reads and "orm" not in stages["sorm"].reads
    assert aliases["orm_final"] == "rerank_orm"
    names = list(stages)
    assert names.index("local_refiner") < names.index("rerank_data") < names.index("rerank_orm") < names.index("calibrate")
    assert "orm" in stages["rerank_orm"].reads and "rerank_records.jsonl" in stages["rerank_orm"].reads
    assert "orm_final" in stages["calibrate"].reads and "orm_final" in stages["inference"].reads
    assert "orm" in stages["value_eval"].reads
    # The locator thresholds are chosen once the value models exist and before anything marks a [BAD] step.
    assert names.index("sorm") < names.index("locate") < names.index("refine_data") < names.index("rerank_data")
    assert all("locate.summary" in stages[s].reads for s in ("rerank_data", "calibrate", "inference", "value_eval"))
    with pytest.raises(ConfigError, match="sorm_init"):
        GloreConfig(**{**base, "sorm_init": "ORM"})
    with pytest.raises(ConfigError, match="sorm_wrong_share"):
        GloreConfig(**{**base, "sorm_wrong_share": 1.5})
    with pytest.raises(ConfigError, match="value_eval_split"):
        GloreConfig(**{**base, "value_eval_split": "train"})


def test_the_final_policy_stage_stops_on_greedy_accuracy_over_the_validation_questions(monkeypatch, tmp_path,
                                                                                       shared_dir):
    """glore.policy_val_target: the stage making the final policy (EI, or the SFT without EI) evaluates
    greedy accuracy on the validation questions (carved from train) and stops on it; no other stage does."""
    import types

    from glore_jax import pipeline
    from glore_jax.recipe import stages as S
    from glore_jax.recipe.config import GloreConfig, stage_config
    from glore_jax.tokenizer import Tokenizer
    c = _load(next(p for p in CONFIGS if p.stem == "demo")).get_config()
    c.unlock()
    c.glore.policy_val_target = 0.5
    exp = {s: pipeline._stage_experiment(c, s, stage_config) for s in ("policy", "ei", "orm")}
    assert (exp["ei"].train.stop_metric, exp["ei"].train.stop_at, exp["ei"].train.eval_every) == (
        S.VAL_ACCURACY, 0.5, 25)
    assert exp["policy"].train.stop_metric == exp["orm"].train.stop_metric == ""
    c.glore.ei_rounds = 0
    assert pipeline._stage_experiment(c, "policy", stage_config).train.stop_metric == S.VAL_ACCURACY
    c.glore.policy_val_target = 0.0
    assert pipeline._stage_experiment(c, "policy", stage_config).train.stop_metric == ""

    seen = {}
    monkeypatch.setattr(S.trainer, "train", lambda e, **kw: seen.update(kw) or ("model", "params"))
    tok = Tokenizer.load(shared_dir / "tokenizers" / "mistral-7b-v0.1" / "tokenizer.model")
    val, test = [{"question": "What is 1 + 1?", "gold": "2"}], [{"question": "What is 2 + 2?", "gold": "4"}]
    c.glore.policy_val_target, c.glore.ei_rounds = 0.5, 1
    ctx = S.Context(g=GloreConfig.from_config(c.glore), seed=0, task="synthetic", max_len=176, mesh=None,
                    tokenizer=tok, train=[], test=test, val=val, stages=exp)
    ctx.train_model("ei", str(tmp_path), records=[])
    (make,) = seen["evaluators"]
    run = types.SimpleNamespace(tokenizer=tok, model=None, mesh=None, exp=exp["ei"])
    evaluator = make(run)
    assert evaluator.records == val and evaluator.name == S.VAL_ACCURACY
    ctx.train_model("orm", str(tmp_path), records=[])
    assert seen["evaluators"] == []
