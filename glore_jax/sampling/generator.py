"""The one front door for generation: token ids (or text) in, completions out, on any mesh.

`Generator` owns a model's params and a `Sampler` (the compiled programs,
one per config and mesh) and cuts any number of prompts into fixed-shape
calls, so a whole pipeline stage, an RL rollout batch or a test reuses one
compiled program per (rows, prompt length, new tokens, strategy). Two shape
policies:
  fixed     `rows` and `max_prompt_len` set: every call has exactly that shape;
            longer prompts are cut by `prompts.fit_prompt` and counted in `truncated`.
  bucketed  left None: one call per request, its rows and prompt length rounded
            up to powers of two, so similar requests share a program.
Each completion carries its tokens, their log-probs under the sampling
distribution's model, and whether it stopped (EOS or a stop id) or was cut
at the token limit, which is what a policy-gradient objective needs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np
from jax.sharding import Mesh

from glore_jax.distributed import host_array
from glore_jax.models import ModelConfig
from glore_jax.prompts import fit_prompt
from glore_jax.sampling.sampler import sampler_for
from glore_jax.sampling.state import SamplingState, StopCondition
from glore_jax.sampling.strategy import SamplingStrategy


def bucket(n: int, minimum: int = 16) -> int:
    """Smallest power of two >= max(n, minimum)."""
    return max(minimum, 1 << max(0, int(n) - 1).bit_length())


def pad_prompts(prompts: Sequence[Sequence[int]], vocab_size: int, *, rows: int, length: int,
                pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Right-pads token lists into ([rows, length] int32, lengths [rows]); extra rows are 1-token dummies."""
    if not prompts:
        raise ValueError("generate needs at least one prompt")
    tokens = np.full((rows, length), pad_id, np.int32)
    lengths = np.ones((rows,), np.int32)
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"Prompt {i} is empty; every prompt needs at least one token (e.g. BOS)")
        if len(p) > length:
            raise ValueError(f"Prompt {i} has {len(p)} tokens, more than the bucket length {length}")
        arr = np.asarray(p, np.int64)
        if arr.min() < 0 or arr.max() >= vocab_size:
            raise ValueError(f"Prompt {i} has token ids outside [0, {vocab_size})")
        tokens[i, :len(p)] = arr
        lengths[i] = len(p)
    return tokens, lengths


@dataclasses.dataclass(frozen=True)
class Completion:
    """One sampled continuation: new tokens (the stop token included), their log-probs, how it ended."""

    tokens: list[int]
    logprobs: list[float]
    stopped: bool            # ended on EOS or a stop id; False: cut at the new-token limit


def completions(state: SamplingState, rows: int, stop: StopCondition) -> list[Completion]:
    tokens, counts = host_array(state.tokens), host_array(state.num_generated)
    logprobs = host_array(state.logprobs)
    stop_ids = set(stop.stop_ids) | ({stop.eos_id} if stop.eos_id is not None else set())
    out = []
    for i in range(rows):
        ids = tokens[i, :counts[i]].tolist()
        out.append(Completion(tokens=ids, logprobs=logprobs[i, :counts[i]].tolist(),
                              stopped=bool(ids) and ids[-1] in stop_ids))
    return out


@dataclasses.dataclass
class Generator:
    """K completions per prompt from one model, in fixed-shape or bucketed calls (see module doc)."""

    config: ModelConfig
    params: object
    max_new: int
    mesh: Mesh | None = None
    pad_id: int = 0
    vocab_limit: int | None = None       # never sample ids at or past this (the tokenizer's size)
    rows: int | None = None              # sequences per call; None = bucketed
    max_prompt_len: int | None = None    # prompt width per call; None = bucketed, never truncated
    tokenizer: object | None = None      # for `complete` (text out)
    progress: Callable[[int, int], None] | None = None
    truncated: int = 0                   # prompts cut to max_prompt_len so far
    prompts_seen: int = 0                # prompts given so far (each counted once, whatever k)
    at_limit: int = 0                    # completions that hit max_new (or `limit`) without stopping
    completions_made: int = 0

    def __post_init__(self):
        if self.max_new < 1:
            raise ValueError(f"max_new must be >= 1, got {self.max_new}")
        self.sampler = sampler_for(self.config, self.mesh, self.pad_id, self.vocab_limit)
        if self.rows is not None:
            m = self.sampler.batch_multiple
            self.rows = max(m, -(-self.rows // m) * m)

    def _pad(self, prompts: Sequence[Sequence[int]], n_rows: int) -> tuple[np.ndarray, np.ndarray]:
        if self.max_prompt_len is None:
            return pad_prompts(prompts, self.config.vocab_size, rows=n_rows,
                               length=bucket(max(len(p) for p in prompts)), pad_id=self.pad_id)
        fitted = []
        for p in prompts:
            ids, cut = fit_prompt(p, self.max_prompt_len)
            self.truncated += cut
            fitted.append(ids)
        return pad_prompts(fitted, self.config.vocab_size, rows=n_rows, length=self.max_prompt_len,
                           pad_id=self.pad_id)

    def generate(self, prompts: Sequence[Sequence[int]], *, k: int = 1,
                 strategy: SamplingStrategy = SamplingStrategy(), stop: StopCondition = StopCondition(),
                 seed: int = 0, limit: int | None = None) -> list[list[Completion]]:
        """K completions of each prompt; K > 1 shares each prompt's prefill among its K rows.

        `limit` (<= max_new) caps new tokens without changing the compiled shape.
        Bucketed calls use `seed` as the stream's name; fixed-shape calls give
        each chunk its own stream, so every (prompt, sample) is drawn once.
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if not prompts:
            raise ValueError("generate needs at least one prompt")
        m = self.sampler.batch_multiple
        if self.rows is None:
            per_call, rows = len(prompts), -(-bucket(len(prompts) * k, 1) // m) * m
        else:
            per_call, rows = max(1, self.rows // k), self.rows
        out: list[list[Completion]] = []
        for start in range(0, len(prompts), per_call):
            chunk = prompts[start:start + per_call]
            call_seed = seed if self.rows is None else seed * 1_000_003 + start
            kw = dict(max_new=self.max_new, strategy=strategy, stop=stop, seed=call_seed, limit=limit)
            if k == 1:
                state = self.sampler.sample(self.params, *self._pad(chunk, rows), **kw)
            else:
                # A multiple of the devices' count: each device's rows read prefixes on that device.
                n_prefix = -(-rows // k)
                n_prefix = -(-n_prefix // m) * m
                state = self.sampler.rollouts(self.params, *self._pad(chunk, n_prefix), k=k, **kw)
            flat = completions(state, len(chunk) * k, stop)
            self.prompts_seen += len(chunk)
            self.completions_made += len(flat)
            self.at_limit += sum(not c.stopped for c in flat)
            out.extend(flat[i * k:(i + 1) * k] for i in range(len(chunk)))
            if self.progress:
                self.progress(min(start + per_call, len(prompts)), len(prompts))
        return out

    def counts(self) -> dict[str, int]:
        """What was cut to a length limit so far (the pipeline reports these per stage)."""
        return {"prompts": self.prompts_seen, "prompts_cut": self.truncated,
                "completions": self.completions_made, "completions_at_limit": self.at_limit}

    def complete(self, prompts: Sequence[Sequence[int]], *, k: int = 1, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0) -> list[list[str]]:
        """Text of K completions of each prompt, stopped at EOS, which is removed."""
        if self.tokenizer is None:
            raise ValueError("Generator.complete decodes text: construct the Generator with a tokenizer")
        eos = self.tokenizer.eos_id
        outs = self.generate(prompts, k=k, strategy=SamplingStrategy(temperature=temperature, top_p=top_p),
                             stop=StopCondition(eos_id=eos), seed=seed)
        return [[self.tokenizer.decode(c.tokens[:-1] if c.stopped else c.tokens) for c in row] for row in outs]
