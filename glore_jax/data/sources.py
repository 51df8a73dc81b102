"""Loading a prepared split as a random-access source of str records."""

from __future__ import annotations

import os
from collections.abc import Sequence

from glore_jax.errors import ConfigError
from glore_jax.data.builders import BUILDERS, programs_config, synthetic_config
from glore_jax.tasks.programs import ProgramConfig
from glore_jax.tasks.synthetic import SyntheticConfig


class RecordSource(Sequence):
    """Random access over a TFDS array_record split, yielding records with str fields.

    Satisfies Grain's RandomAccessDataSource protocol (`__len__`,
    `__getitem__`), so it feeds `grain.MapDataset.source` directly.
    """

    def __init__(self, data_source, *, name: str):
        self._source = data_source
        self.name = name

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {self.name} of size {len(self)}")
        return _decode(self._source[index % len(self)])

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, str]]:
        return [_decode(r) for r in self._source.__getitems__(list(indices))]

    def __repr__(self) -> str:
        return f"RecordSource({self.name}, {len(self)} records)"


def _decode(record: dict) -> dict[str, str]:
    return {k: v.decode("utf-8") if isinstance(v, bytes) else v for k, v in record.items()}


def make_builder(task: str, data_dir: str | os.PathLike | None = None, *,
                 manual_dir: str | os.PathLike | None = None, synthetic: SyntheticConfig | None = None,
                 programs: ProgramConfig | None = None, skip_malformed: bool = False):
    """The TFDS builder of `task` ('gsm8k' | 'svamp' | 'synthetic' | 'programs')."""
    if task not in BUILDERS:
        raise ConfigError(f"unknown task {task!r}; expected one of {sorted(BUILDERS)}")
    if synthetic is not None and task != "synthetic":
        raise ConfigError("`synthetic` knobs only apply to task='synthetic'")
    if programs is not None and task != "programs":
        raise ConfigError("`programs` knobs only apply to task='programs'")
    if manual_dir is not None and task in ("synthetic", "programs"):
        raise ConfigError(f"the {task} task is generated; it takes no manual_dir")
    kwargs = dict(data_dir=os.fspath(data_dir) if data_dir is not None else None,
                  manual_dir=manual_dir, skip_malformed=skip_malformed)
    if task == "synthetic":
        task_config = synthetic or SyntheticConfig()
        # TFDS refuses a new config object under a registered name: pass the name.
        kwargs["config"] = "default" if task_config == SyntheticConfig() else synthetic_config(task_config)
    if task == "programs":
        program_config = programs or ProgramConfig()
        kwargs["config"] = "default" if program_config == ProgramConfig() else programs_config(program_config)
    return BUILDERS[task](**kwargs)


def load(task: str, split: str, data_dir: str | os.PathLike | None = None, *,
         manual_dir: str | os.PathLike | None = None, synthetic: SyntheticConfig | None = None,
         programs: ProgramConfig | None = None, skip_malformed: bool = False) -> RecordSource:
    """A split of `task` as a RecordSource, preparing it into `data_dir` first if needed.

    gsm8k/svamp read `manual_dir` (the directory holding train/test.jsonl or
    SVAMP.json) when given, else download. Preparation happens once; later
    calls only open the files.
    """
    builder = make_builder(task, data_dir, manual_dir=manual_dir, synthetic=synthetic, programs=programs,
                           skip_malformed=skip_malformed)
    builder.download_and_prepare()
    sources = builder.as_data_source()
    if split not in sources:
        raise ConfigError(f"{task} has splits {sorted(sources)}, not {split!r}")
    return RecordSource(sources[split], name=f"{task}/{split}")
