"""Multi-turn verify-and-refine episodes: attempt, the tool's report, a refinement, ... (RefineRL).

`run_episodes` samples turn 1 for K rows per question (the prefix shared),
checks every attempt with the task's tool, appends the report as
observation tokens (`prompts.agent_formats`), and samples the next turn
from the whole history, up to `turns` turns. With `skeptical=True` every
row takes every turn, also when its public checks passed: that is the
Skeptical-Agent, which must justify a passing program or change it. With
`skeptical=False` a row stops once its public checks pass (the plain
verify-and-refine baseline). Each turn is one call of the jitted sampler at
a fixed width, so T turns compile T shapes once.

An `Episode` keeps the whole sequence with each turn's sampled span (the
only tokens that carry loss), every turn's text and check, and the final
turn's. `episode_metrics` counts what the issue asks for: pass@1 of the
first attempt and after the last turn, the share of turns that changed a
program that passed its public tests, how many of those changes fixed a
hidden failure or broke a right program, and the tool's time.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from glore_jax import prompts
from glore_jax.agent.tools import Check
from glore_jax.prompts import agent_formats, fit_prompt
from glore_jax.sampling import Generator, SamplingStrategy, StopCondition


@dataclasses.dataclass(frozen=True, kw_only=True)
class EpisodeShape:
    """Token budgets: the question's prompt, each attempt, each observation; `turns` attempts."""

    turns: int
    max_prompt_len: int
    max_new_tokens: int
    max_obs_tokens: int

    def prompt_width(self, turn: int) -> int:
        """Widest prompt of turn `turn` (1-based): the history of the turns before it."""
        return self.max_prompt_len + (turn - 1) * (self.max_new_tokens + 1 + self.max_obs_tokens)

    @property
    def width(self) -> int:
        return self.prompt_width(self.turns) + self.max_new_tokens


@dataclasses.dataclass
class Episode:
    record: Mapping[str, Any]
    tokens: list[int]                          # the whole episode, every turn
    spans: list[tuple[int, int]]               # each turn's sampled tokens [start, end) in `tokens`
    texts: list[str]                           # each turn's attempt (EOS removed)
    checks: list[Check]                        # the tool's check of each attempt
    stopped: list[bool]                        # each turn ended on EOS (not at the token limit)
    obs_cut: int = 0                           # reports cut to max_obs_tokens

    @property
    def final(self) -> Check:
        return self.checks[-1]


def run_episodes(model, params, tok, records: Sequence[Mapping[str, Any]], tool, mesh, shape: EpisodeShape, *,
                 k: int = 1, temperature: float = 0.0, seed: int = 0, skeptical: bool = True,
                 rows: int | None = None) -> list[Episode]:
    """K episodes per record, in order (record i's are i*K .. i*K+K-1). temperature 0: greedy."""
    strategy, stop = SamplingStrategy(temperature=temperature), StopCondition(eos_id=tok.eos_id)
    n = len(records) * k
    kw = dict(max_new=shape.max_new_tokens, mesh=mesh, pad_id=tok.pad_id, vocab_limit=tok.vocab_size,
              rows=rows or n)
    firsts = [fit_prompt(prompts.policy_prompt(tok, r["question"]), shape.max_prompt_len)[0] for r in records]
    gen = Generator(model, params, max_prompt_len=shape.prompt_width(1), **kw)
    outs = [c for group in gen.generate(firsts, k=k, strategy=strategy, stop=stop, seed=seed) for c in group]
    owners = [r for r in records for _ in range(k)]
    episodes = [Episode(record=r, tokens=list(p), spans=[], texts=[], checks=[], stopped=[])
                for r, p in zip(owners, [p for p in firsts for _ in range(k)])]
    active = list(range(n))
    for turn in range(1, shape.turns + 1):
        for i, c in zip(active, outs):
            ep = episodes[i]
            start = len(ep.tokens)
            ep.tokens += c.tokens
            ep.spans.append((start, len(ep.tokens)))
            ep.texts.append(tok.decode(c.tokens[:-1] if c.stopped else c.tokens))
            ep.stopped.append(c.stopped)
        for i, check in zip(active, tool.check([owners[i] for i in active], [episodes[i].texts[-1] for i in active])):
            episodes[i].checks.append(check)
        if turn == shape.turns:
            break
        active = [i for i in active if skeptical or not episodes[i].checks[-1].public_ok]
        if not active:
            break
        nexts = []
        for i in active:
            ep = episodes[i]
            start, end = ep.spans[-1]
            nxt, _ = agent_formats.next_prompt(tok, ep.tokens[:start], ep.tokens[start:end], ep.checks[-1].report,
                                               shape.max_obs_tokens)
            ep.obs_cut += len(tok.encode(ep.checks[-1].report)) + 1 > shape.max_obs_tokens
            ep.tokens = nxt
            nexts.append(nxt)
        gen = Generator(model, params, max_prompt_len=shape.prompt_width(turn + 1), **kw)
        outs = [g[0] for g in gen.generate(nexts, strategy=strategy, stop=stop, seed=seed + turn)]
    return episodes


def turn_counts(ep: Episode) -> dict[str, int]:
    """Refinement turns after a public-passing attempt; those that changed the program; of those, how
    many fixed a hidden failure and how many broke a right program."""
    out = {"passing_turns": 0, "changed_passing": 0, "fixed": 0, "broke": 0}
    for t in range(1, len(ep.texts)):
        before, after = ep.checks[t - 1], ep.checks[t]
        if before.public_ok:
            out["passing_turns"] += 1
            if _program(ep.texts[t]) != _program(ep.texts[t - 1]):
                out["changed_passing"] += 1
                out["fixed"] += (not before.solved) and after.solved
                out["broke"] += before.solved and not after.solved
    return out


def episode_metrics(episodes: Sequence[Episode]) -> dict[str, float]:
    """pass@1 first/final, refinement-turn counts (changed a public-passing program; fixed; broke), tool time."""
    n = max(len(episodes), 1)
    counts = {k: sum(turn_counts(ep)[k] for ep in episodes) for k in ("passing_turns", "changed_passing", "fixed",
                                                                       "broke")}
    passing_turns, changed_passing = counts["passing_turns"], counts["changed_passing"]
    refine_turns = sum(len(ep.texts) - 1 for ep in episodes)
    return {"pass1_first": sum(ep.checks[0].solved for ep in episodes) / n,
            "pass1_final": sum(ep.final.solved for ep in episodes) / n,
            "reward_final": sum(ep.final.reward for ep in episodes) / n,
            "public_ok_first": sum(ep.checks[0].public_ok for ep in episodes) / n,
            "refine_turns": refine_turns, "passing_turns": passing_turns,
            "changed_passing": changed_passing / max(passing_turns, 1),
            "changed_passing_count": changed_passing, "fixed": counts["fixed"], "broke": counts["broke"],
            "turns_per_episode": sum(len(ep.texts) for ep in episodes) / n,
            "obs_cut": sum(ep.obs_cut for ep in episodes) / max(refine_turns, 1),
            "tool_seconds": sum(c.seconds for ep in episodes for c in ep.checks)}


def _program(text: str) -> str:
    """An attempt without its `# check:` line and trailing space: what runs."""
    lines = [line.rstrip() for line in text.strip().splitlines()]
    return "\n".join(line for line in lines if not line.lstrip().startswith("#"))
