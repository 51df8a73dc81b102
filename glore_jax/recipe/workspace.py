"""Resumable stages on disk: nothing half-written, nothing done twice; a stage table run in order.

Each stage owns `<workdir>/stages/<name>/` and is finished when its
`done.json` exists; `done.json` is written last, by rename, so a crash
leaves a stage either finished or resumable. Sampling stages write their
output in shards (`shard_00003.jsonl`), each also by rename, and a rerun
skips the shards already there; training stages resume from the trainer's
own Orbax checkpoints. `run_table` runs a table of stages (`recipe.table`),
resolving each stage's declared inputs by name and checking its declared
outputs exist when it finishes.

Multi-process runs (`glore_jax.distributed`): every process runs every stage
(training and sampling are collectives over one global mesh) and takes the
same skip decisions, which process 0 makes from the disk; only process 0
writes, and the others wait at a barrier until the file is there to read.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax

from glore_jax import distributed, files
from glore_jax.compile_cache import CompileClock
from glore_jax.data.store import RecordsFile, write_records

DONE = "done.json"


def log(message: str) -> None:
    if jax.process_index() == 0:
        print(f"[glore] {message}", flush=True)


@dataclasses.dataclass(frozen=True)
class StageIO:
    """A running stage's directory and its declared inputs, resolved by name when first read."""

    dir: str
    reads: tuple[str, ...]
    resolve: Callable[[str], Any]
    timings: dict[str, float]   # seconds per stage so far (the report shows them)
    truncation: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)  # counts per stage so far
    compile_timings: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)  # CompileClock per stage

    def __getitem__(self, name: str) -> Any:
        if name not in self.reads:
            raise KeyError(f"this stage declares inputs {list(self.reads)}, not {name!r}")
        return self.resolve(name)


class Workspace:
    def __init__(self, workdir: str, total_stages: int):
        self.root = os.path.abspath(workdir)
        self.total = total_stages
        self.count = 0
        self.timings: dict[str, float] = {}
        self.compile_timings: dict[str, dict[str, float]] = {}   # per stage: CompileClock's reading
        self.truncation: dict[str, dict[str, int]] = {}
        self.results: dict[str, Any] = {}

    def run_table(self, table: Sequence[Any], load_model: Callable[[str, str], Any], context: Any,
                  aliases: Mapping[str, str] = {},
                  counts: Callable[[], dict[str, int]] | None = None, stop_after: str = "") -> dict[str, Any]:
        """Runs `table` in order (up to and including `stop_after`, if given); returns every stage's summary.

        `counts()` is called after each stage that runs and returns what it
        cut to a length limit (`truncation_warnings` names the keys); they are
        saved with the stage and handed to later stages as `io.truncation`.

        A name read resolves through `aliases`, then: `x.summary` -> stage x's
        summary, `x.jsonl` -> that file in the directory of the stage that
        writes it, anything else -> `load_model(name, directory of its stage)`.
        """
        writers = {w: stage.name for stage in table for w in stage.writes}

        def resolve(name: str) -> Any:
            name = aliases.get(name, name)
            if name.endswith(".summary"):
                return self.results[name.removesuffix(".summary")]
            if name not in writers:
                raise KeyError(f"no stage writes {name!r}")
            d = self.stage_dir(writers[name])
            return os.path.join(d, name) if name.endswith(".jsonl") else load_model(name, d)

        for stage in table:
            if stop_after and self.results and list(self.results)[-1] == stop_after:
                log(f"stopping after stage {stop_after} (glore.stop_after)")
                break
            io = StageIO(dir=self.stage_dir(stage.name), reads=stage.reads, resolve=resolve, timings=self.timings,
                         truncation=self.truncation, compile_timings=self.compile_timings)
            self.results[stage.name] = self.run(stage.name, lambda d, stage=stage, io=io: stage.run(context, io),
                                                counts=counts)
            missing = [w for w in stage.writes if w.endswith(".jsonl") and not os.path.exists(os.path.join(io.dir, w))]
            if missing:
                raise RuntimeError(f"stage {stage.name} finished without writing its declared outputs {missing} "
                                   f"(a stage done by older code? delete {io.dir} to run it again)")
        return self.results

    def stage_dir(self, name: str) -> str:
        return os.path.join(self.root, "stages", name)

    def run(self, name: str, fn: Callable[[str], dict[str, Any]],
            counts: Callable[[], dict[str, int]] | None = None) -> dict[str, Any]:
        """Runs `fn(stage_dir)` unless the stage is finished; returns its (saved) result."""
        self.count += 1
        d = self.stage_dir(name)
        done = os.path.join(d, DONE)
        if distributed.agree(os.path.exists(done)):
            saved = files.read_json_file(done)
            self.timings[name] = saved["seconds"]
            self.compile_timings[name] = {k: saved[k] for k in CompileClock.KEYS if k in saved}
            self.truncation[name] = saved.get("truncation", {})
            log(f"stage {self.count}/{self.total} {name}: already done, skipped")
            return saved["result"]
        os.makedirs(d, exist_ok=True)
        log(f"stage {self.count}/{self.total} {name}: running")
        t0, clock = time.perf_counter(), CompileClock()
        if counts is not None:
            counts()  # start this stage's count from zero
        result = fn(d)
        seconds = time.perf_counter() - t0
        compiled = clock.read()
        self.timings[name] = seconds
        self.compile_timings[name] = compiled
        self.truncation[name] = counts() if counts is not None else {}
        for warning in truncation_warnings(self.truncation[name]):
            log(f"WARNING stage {name}: {warning}")
        distributed.write_once(done, lambda: files.write_json(
            done, {"result": result, "seconds": seconds, "truncation": self.truncation[name], **compiled},
            indent=2, default=float))
        log(f"stage {self.count}/{self.total} {name}: done in {seconds:.0f}s (tracing and compiling "
            f"{compiled['compile_seconds']:.0f}s; {compiled['compile_cache_hits']} programs from the compile cache, "
            f"~{compiled['compile_seconds_saved']:.0f}s saved)")
        return result


# (what was cut, out of how many, what to raise): the keys of the counts stages report.
_CUT_KEYS = (("prompts_cut", "prompts", "sampled prompts cut to glore.max_prompt_len"),
             ("completions_at_limit", "completions", "completions stopped at glore.max_new_tokens"),
             ("scored_cut", "scored", "scored solutions cut to data.max_len"),
             ("train_prompts_cut", "train_examples", "training prompts cut to the stage's max_len"),
             ("train_targets_cut", "train_examples", "training targets cut to the stage's max_len"))
WARN_FRACTION = 0.01


def truncation_warnings(counts: Mapping[str, int]) -> list[str]:
    """One line per kind of cut above 1% of its total, e.g. '12 of 480 sampled prompts cut to ...'."""
    out = []
    for cut, total, what in _CUT_KEYS:
        n, of = counts.get(cut, 0), counts.get(total, 0)
        if of and n / of > WARN_FRACTION:
            out.append(f"{n} of {of} {what} ({100 * n / of:.1f}%)")
    return out


def sharded(stage_dir: str, items: Sequence[Any], fn: Callable[[Sequence[Any], int], list[dict]],
            shard_size: int, *, label: str) -> list[dict]:
    """Applies fn(items_chunk, shard_index) -> records shard by shard; finished shards are reused."""
    out: list[dict] = []
    n_shards = -(-len(items) // shard_size)
    for i in range(n_shards):
        path = os.path.join(stage_dir, f"shard_{i:05d}.jsonl")
        if distributed.agree(os.path.exists(path)):
            out.extend(RecordsFile(path))
            continue
        t0 = time.perf_counter()
        records = fn(items[i * shard_size:(i + 1) * shard_size], i)
        distributed.write_once(path, lambda: write_records(path, records))
        out.extend(records)
        log(f"  {label}: shard {i + 1}/{n_shards} ({len(records)} records, {time.perf_counter() - t0:.0f}s)")
    return out


def records_path(stage_dir: str, name: str, records: Sequence[dict]) -> str:
    """Writes records once (atomically) and returns the path the trainer reads."""
    path = os.path.join(stage_dir, name)
    if not distributed.agree(os.path.exists(path)):
        distributed.write_once(path, lambda: write_records(path, records))
    return path
