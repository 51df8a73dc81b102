"""TFDS builders for gsm8k, svamp and synthetic, written as array_record.

TensorFlow is never imported: `GeneratorBasedBuilder` with
`file_format='array_record'` writes through TFDS's own array_record writer
and is read back with `as_data_source()` (no tf.data). The builders are
registered as `glore_gsm8k`, `glore_svamp` and `glore_synthetic` because TFDS
ships its own `gsm8k` and registered names must be unique.

Splits:
    gsm8k      train 7473 / test 1319, the official files.
    svamp      train 700 / test 300: SVAMP has no official split, so problems
               are ordered by sha256 of their ID and the first 300 form test.
               Hash order (not an RNG) keeps the split stable if rows move.
    synthetic  train/test sizes from `SyntheticConfig`; test problems never
               appear in train (see `glore_jax.tasks.synthetic`).
    programs   train/test sizes from `ProgramConfig`; no test function appears
               in train (see `glore_jax.tasks.programs`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Iterator

import tensorflow_datasets as tfds

from glore_jax.errors import MissingPathError
from glore_jax.data.records import RECORD_FIELDS, ReadStats, read_gsm8k_jsonl, read_svamp_json
from glore_jax.tasks import programs
from glore_jax.tasks.synthetic import SyntheticConfig, generate_split

GSM8K_URL = "https://raw.githubusercontent.com/openai/grade-school-math/master/grade_school_math/data/{split}.jsonl"
SVAMP_URL = "https://raw.githubusercontent.com/arkilpatel/SVAMP/main/SVAMP.json"
SVAMP_TEST_SIZE = 300
FILE_FORMAT = "array_record"


def _features() -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict({name: tfds.features.Text() for name in RECORD_FIELDS})


class _RecordBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Shared plumbing: the record features, a local source directory, malformed-line policy."""

    VERSION = tfds.core.Version("1.0.0")

    def __init__(self, *, manual_dir: str | os.PathLike | None = None, skip_malformed: bool = False,
                 **kwargs):
        kwargs.setdefault("file_format", FILE_FORMAT)
        super().__init__(**kwargs)
        self._source_dir = os.fspath(manual_dir) if manual_dir is not None else None
        self._skip_malformed = skip_malformed
        self.read_stats: dict[str, ReadStats] = {}

    # TFDS locates a builder's checksum file from its code path, a lookup that
    # needs the `importlib_resources` backport on py>=3.9 for package modules.
    # These builders register no checksums, so they have no code path.
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> None:
        return None

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, description=self.__doc__, features=_features())

    def _local_or_download(self, dl_manager, filenames: dict[str, str], urls: dict[str, str]) -> dict[str, str]:
        if self._source_dir is None:
            return {k: os.fspath(p) for k, p in dl_manager.download(urls).items()}
        paths = {k: os.path.join(self._source_dir, name) for k, name in filenames.items()}
        missing = [p for p in paths.values() if not os.path.isfile(p)]
        if missing:
            raise MissingPathError(f"{self.name}: manual_dir {self._source_dir} lacks {missing}")
        return paths

    def _stats(self, split: str) -> ReadStats:
        return self.read_stats.setdefault(split, ReadStats())


class GloreGsm8k(_RecordBuilder):
    """GSM8K (Cobbe et al. 2021): grade-school math with step-per-line reference solutions."""

    def _split_generators(self, dl_manager):
        splits = ("train", "test")
        paths = self._local_or_download(dl_manager, {s: f"{s}.jsonl" for s in splits},
                                        {s: GSM8K_URL.format(split=s) for s in splits})
        return {s: self._generate_examples(paths[s], s) for s in splits}

    def _generate_examples(self, path: str, split: str) -> Iterator[tuple[str, dict]]:
        for record in read_gsm8k_jsonl(path, split=split, skip_malformed=self._skip_malformed,
                                       stats=self._stats(split)):
            yield record["id"], record


class GloreSvamp(_RecordBuilder):
    """SVAMP (Patel et al. 2021): 1000 one/two-step problems; the equation is kept in `meta`."""

    def _split_generators(self, dl_manager):
        path = self._local_or_download(dl_manager, {"all": "SVAMP.json"}, {"all": SVAMP_URL})["all"]
        stats = self._stats("all")
        records = list(read_svamp_json(path, skip_malformed=self._skip_malformed, stats=stats))
        by_hash = sorted(records, key=lambda r: hashlib.sha256(r["id"].encode()).hexdigest())
        test_ids = frozenset(r["id"] for r in by_hash[:SVAMP_TEST_SIZE])
        return {"train": self._generate_examples([r for r in records if r["id"] not in test_ids]),
                "test": self._generate_examples([r for r in records if r["id"] in test_ids])}

    def _generate_examples(self, records: list[dict]) -> Iterator[tuple[str, dict]]:
        for record in records:
            yield record["id"], record


@dataclasses.dataclass
class SyntheticBuilderConfig(tfds.core.BuilderConfig):
    """A TFDS config wrapping the generator's knobs; `synthetic_config()` names it."""

    task: SyntheticConfig = dataclasses.field(default_factory=SyntheticConfig)


def synthetic_config(task: SyntheticConfig = SyntheticConfig()) -> SyntheticBuilderConfig:
    """Builder config for `task`. Non-default knobs get a name hashed from them, so each
    variant is prepared into its own directory and never read back as another."""
    return _named(SyntheticBuilderConfig, task, SyntheticConfig())


def _named(cls, task, default):
    if task == default:
        return cls(name="default", task=task)
    digest = hashlib.sha256(repr(dataclasses.asdict(task)).encode()).hexdigest()[:12]
    return cls(name=f"c{digest}", description=repr(task), task=task)


@dataclasses.dataclass
class ProgramsBuilderConfig(tfds.core.BuilderConfig):
    """A TFDS config wrapping the program generator's knobs; `programs_config()` names it."""

    task: programs.ProgramConfig = dataclasses.field(default_factory=programs.ProgramConfig)


def programs_config(task: programs.ProgramConfig = programs.ProgramConfig()) -> ProgramsBuilderConfig:
    """Builder config for `task`, named like `synthetic_config`'s."""
    return _named(ProgramsBuilderConfig, task, programs.ProgramConfig())


class _GeneratedBuilder(_RecordBuilder, skip_registration=True):
    """A generated task: its config's generator writes both splits (no download)."""

    def _split_generators(self, dl_manager):
        del dl_manager
        return {s: self._generate_examples(s) for s in ("train", "test")}

    def _generate_examples(self, split: str) -> Iterator[tuple[str, dict]]:
        stats = self._stats(split)
        for record in type(self).generate(self.builder_config.task, split):
            stats.read += 1
            yield record["id"], record


class GloreSynthetic(_GeneratedBuilder):
    """Procedurally generated multi-step arithmetic word problems (no download)."""

    BUILDER_CONFIGS = [synthetic_config()]
    generate = staticmethod(generate_split)


class GlorePrograms(_GeneratedBuilder):
    """Procedurally generated small-function synthesis problems with public and hidden tests (no download)."""

    BUILDER_CONFIGS = [programs_config()]
    generate = staticmethod(programs.generate_split)


BUILDERS: dict[str, type[_RecordBuilder]] = {
    "gsm8k": GloreGsm8k, "svamp": GloreSvamp, "synthetic": GloreSynthetic, "programs": GlorePrograms}
