"""Prepares a task's TFDS array_record files and prints the count of each split.

    python -m glore_jax.data.prepare --task gsm8k --manual_dir ../shared/data/gsm8k --data_dir DIR
    python -m glore_jax.data.prepare --task svamp --manual_dir ../shared/data/svamp --data_dir DIR
    python -m glore_jax.data.prepare --task synthetic --data_dir DIR [--synthetic_train_size N ...]
    python -m glore_jax.data.prepare --task programs --data_dir DIR          (the default ProgramConfig)
"""

from __future__ import annotations

from absl import app, flags

from glore_jax.data.sources import make_builder
from glore_jax.tasks.synthetic import SyntheticConfig

_TASK = flags.DEFINE_enum("task", None, ["gsm8k", "svamp", "synthetic", "programs"], "Task to prepare.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data directory to write into.")
_MANUAL_DIR = flags.DEFINE_string("manual_dir", None, "Local directory with the source files "
                                  "(gsm8k: train/test.jsonl, svamp: SVAMP.json); default: download.")
_SKIP = flags.DEFINE_bool("skip_malformed", False, "Skip and count malformed source lines instead of failing.")
_DEFAULTS = SyntheticConfig()
_SYN_TRAIN = flags.DEFINE_integer("synthetic_train_size", _DEFAULTS.train_size, "Synthetic train size.")
_SYN_TEST = flags.DEFINE_integer("synthetic_test_size", _DEFAULTS.test_size, "Synthetic test size.")
_SYN_SEED = flags.DEFINE_integer("synthetic_seed", _DEFAULTS.seed, "Synthetic generator seed.")
_SYN_MIN = flags.DEFINE_integer("synthetic_min_steps", _DEFAULTS.min_steps, "Fewest steps per problem.")
_SYN_MAX = flags.DEFINE_integer("synthetic_max_steps", _DEFAULTS.max_steps, "Most steps per problem.")
flags.mark_flags_as_required(["task", "data_dir"])


def main(argv):
    del argv
    synthetic = None
    if _TASK.value == "synthetic":
        synthetic = SyntheticConfig(train_size=_SYN_TRAIN.value, test_size=_SYN_TEST.value,
                                    seed=_SYN_SEED.value, min_steps=_SYN_MIN.value, max_steps=_SYN_MAX.value)
    builder = make_builder(_TASK.value, _DATA_DIR.value, manual_dir=_MANUAL_DIR.value,
                           synthetic=synthetic, skip_malformed=_SKIP.value)
    builder.download_and_prepare()
    print(f"{_TASK.value} -> {builder.data_dir}")
    for split, info in sorted(builder.info.splits.items()):
        print(f"  {split}: {info.num_examples} records")
    for split, stats in sorted(builder.read_stats.items()):
        if stats.skipped_malformed:
            print(f"  {split}: skipped {stats.skipped_malformed} malformed source entries")


if __name__ == "__main__":
    app.run(main)
