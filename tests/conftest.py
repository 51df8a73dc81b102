"""Every test process sees 8 CPU devices, so mesh tests run without hardware."""

import os
import tempfile

# LLVM's -O0 for XLA:CPU code: the tests' programs are tiny and compiled once or twice, so compile
# time is most of their cost (the smoke pipeline: 17% less CPU; the whole suite under `-n 2`:
# 17.5 -> 15.2 minutes). The HLO passes are XLA's usual ones; code generation, and so the last bits
# of some float results, differs from the command lines' default -O2. Every test compares results
# computed under the same flags, or against torch with a tolerance.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache per test run, shared by its xdist workers and the command lines
# tests start: a kill-and-resume test's second process, or a test building the same step again,
# loads the executable instead of compiling it (test_latro.py: 128 -> 91 s). The size limit turns
# on the cache's file lock, so one worker never reads another's half-written entry.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    tempfile.gettempdir(), "glore_jax_test_jit", os.environ.get("PYTEST_XDIST_TESTRUNUID", f"pid{os.getpid()}")))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 << 30))

import jax  # noqa: E402  (must come after XLA_FLAGS)

jax.config.update("jax_default_matmul_precision", "highest")

from glore_jax import hardware  # noqa: E402

# The processes started from here on (pytest-xdist's workers, the command lines tests run) get
# glibc's huge-page malloc, as `python -m glore_jax.*` gives itself (hardware.MALLOC_TUNABLE).
os.environ.update(hardware.malloc_env(dict(os.environ)) or {})

import pathlib  # noqa: E402

import pytest  # noqa: E402

SHARED = pathlib.Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> pathlib.Path:
    if not SHARED.is_dir():
        raise FileNotFoundError(f"Expected the shared data folder beside the project at {SHARED}")
    return SHARED


# Shared by the training tests (test_train, test_reliability): a small synthetic task, a tokenizer
# trained on it, and a 1-device mesh.
TASK_TRAIN = dict(train_size=48, test_size=8, min_steps=1, max_steps=2, seed=3)


@pytest.fixture(scope="module")
def task_records():
    from glore_jax.tasks import SyntheticConfig, generate_split
    return list(generate_split(SyntheticConfig(**TASK_TRAIN), "train"))


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory, task_records):
    from glore_jax.tokenizer import train_tokenizer
    path = tmp_path_factory.mktemp("tok") / "synthetic.model"
    train_tokenizer((t for r in task_records for t in (r["question"], r["answer"])), 320, path)
    return str(path)


@pytest.fixture(scope="module")
def one_device():
    from glore_jax.sharding import make_mesh
    return make_mesh((1, 1, 1), devices=jax.devices()[:1])


@pytest.fixture(scope="session")
def warm_policy(tmp_path_factory):
    """A tiny policy after a short SFT on one-step problems: right often enough for rewards to vary."""
    from glore_jax import trainer
    from glore_jax.sharding import make_mesh
    from glore_jax.tasks import generate_split
    from glore_jax.tokenizer import train_tokenizer
    from glore_jax.training.evals import GenerationEval
    from tests import onpolicy
    root = tmp_path_factory.mktemp("warm")
    records = list(generate_split(onpolicy.TASK, "train"))
    tok = str(root / "tok.model")
    train_tokenizer((t for r in records for t in (r["question"], r["answer"])), 512, tok)
    c = onpolicy.config(root / "sft", tok, "", 150)
    c.init_from, c.train.learning_rate, c.train.warmup_steps, c.train.log_every = "", 1e-2, 10, 50
    c.train.eval_every = 75
    held_out = list(generate_split(onpolicy.TASK, "test"))
    trainer.train(c, objective="sft", records=records, mesh=make_mesh((1, 1, 1), devices=jax.devices()[:1]),
                  evaluators=[lambda run: GenerationEval(run, held_out, max_new=40, rows=8)])
    return tok, str(root / "sft")


# Seconds each file took under `-n 2 --dist loadfile` on the slow 2-core CI machine (2026-12-02).
# xdist hands out whole files in collection order (with --no-loadscope-reorder); longest first
# keeps the two workers' totals within a file of each other. By the test count (xdist's own
# default) the workers ended 1,048 and 774 s into the run. Files not listed run last.
FILE_SECONDS = {
    "test_train.py": 302, "test_pipeline.py": 226, "test_agent.py": 186,
    "test_models.py": 157, "test_multiprocess.py": 122, "test_reliability.py": 95, "test_latro.py": 90,
    "test_onpolicy.py": 88, "test_packing.py": 45, "test_scoring.py": 35, "test_score.py": 40,
    "test_objectives.py": 39, "test_export.py": 29, "test_compile.py": 37, "test_malformed.py": 20,
    "test_rl.py": 16, "test_hardware.py": 15, "test_data.py": 12, "test_convert.py": 9,
    # Not measured there: ~2x their seconds on the Zen 5 alone after their reference forwards were jitted
    # (2026-12-04): test_attention_core.py (here), test_packing.py and test_scoring.py (above).
    "test_attention_core.py": 25,
    # test_sampling.py's 216 s there, split on 2026-12-04 in the two parts' ratio on the Zen 5 alone (49 and 38 s).
    "test_sampling.py": 122, "test_sampling_data_parallel.py": 98,
}


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: -FILE_SECONDS.get(item.path.name, 0))  # stable: a file's own order stays
