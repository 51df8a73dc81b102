"""Two-turn episodes for SCoRe: an attempt, the self-correction instruction, a second attempt; one sequence.

`TwoTurnRollouts` is the experience source of the `score` objective. Per
step it takes `batch_size / group_size` questions, samples G first attempts
of each (prefix shared across the G rows), builds each one's turn-2 prompt
from the sampled ids (`prompts.self_correct_prompt`), samples one second
attempt per row, and rewards both turns. Each row is one episode:

    tokens      <bos> question <SOL> y1 [<eos>] <eos>? instruction <SOL> y2 [<eos>] pad...
    turn_ids    0 ...               0 1 ... 1   0 ...                0  2 ... 2  0 ...
    loss_mask   turn_ids > 0: the sampled tokens of both turns (the instruction is prompt, no loss)
    rewards_t1, rewards_t2, correct_t1, correct_t2, identical, adv_t1, adv_t2    [B]

(y1's EOS is a sampled token when the sampler stopped; when y1 hit the
token limit, the format adds an EOS to close the turn, and it carries no
loss.) `greedy_two_turn` is the same episode, greedy, for evaluation.
Resume is exact for the reasons `Rollouts` gives.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import jax
import numpy as np

from glore_jax import prompts
from glore_jax.prompts import fit_prompt
from glore_jax.rl.config import RLConfig, ScoreConfig
from glore_jax.rl.rollouts import Rollouts
from glore_jax.rl.score import turn_advantages
from glore_jax.sampling import Generator, SamplingStrategy, StopCondition
from glore_jax.tasks import is_correct
from glore_jax.tokenizer import Tokenizer


def separator_len(tok: Tokenizer) -> int:
    """Tokens between y1 and y2: <eos>, the instruction, <SOL>."""
    return len(prompts.self_correct_prompt(tok, [], []))


def widths(tok: Tokenizer, cfg: RLConfig) -> tuple[int, int]:
    """(turn-2 prompt width, episode width) for these length knobs."""
    second = cfg.max_prompt_len + cfg.max_new_tokens + separator_len(tok)
    return second, second + cfg.max_new_tokens


def _body(tokens: Sequence[int], stopped: bool) -> list[int]:
    return list(tokens[:-1] if stopped else tokens)


def two_turn(gen1: Generator, gen2: Generator, tok: Tokenizer, first_prompts: Sequence[list[int]], *, k: int,
             strategy: SamplingStrategy, seed: int):
    """[(first prompt, y1 completion, turn-2 prompt, y2 completion)] for k episodes of each prompt, in order."""
    stop = StopCondition(eos_id=tok.eos_id)
    first = [c for group in gen1.generate(first_prompts, k=k, strategy=strategy, stop=stop, seed=seed)
             for c in group]
    owners = [p for p in first_prompts for _ in range(k)]
    second_prompts = [prompts.self_correct_prompt(tok, p, c.tokens) for p, c in zip(owners, first)]
    second = [g[0] for g in gen2.generate(second_prompts, strategy=strategy, stop=stop, seed=seed + 1)]
    return list(zip(owners, first, second_prompts, second))


def greedy_two_turn(model, params, tok: Tokenizer, records: Sequence[dict], mesh, *, max_new: int,
                    max_prompt_len: int, rows: int = 64) -> list[dict]:
    """Greedy y1 and y2 for each record: {'t1', 't2' (texts), 'correct_t1', 'correct_t2', 'identical'}."""
    cfg = RLConfig(max_new_tokens=max_new, max_prompt_len=max_prompt_len)
    second_len, _ = widths(tok, cfg)
    kw = dict(max_new=max_new, mesh=mesh, pad_id=tok.pad_id, vocab_limit=tok.vocab_size, rows=rows)
    gen1, gen2 = Generator(model, params, max_prompt_len=max_prompt_len, **kw), \
        Generator(model, params, max_prompt_len=second_len, **kw)
    firsts = [fit_prompt(prompts.get("policy").prompt(tok, r), max_prompt_len)[0] for r in records]
    out = []
    for r, (_, c1, _, c2) in zip(records, two_turn(gen1, gen2, tok, firsts, k=1, strategy=SamplingStrategy(),
                                                   seed=0)):
        y1, y2 = _body(c1.tokens, c1.stopped), _body(c2.tokens, c2.stopped)
        t1, t2 = tok.decode(y1), tok.decode(y2)
        out.append({"t1": t1, "t2": t2, "correct_t1": is_correct(t1, r["gold"]),
                    "correct_t2": is_correct(t2, r["gold"]), "identical": y1 == y2})
    return out


class TwoTurnRollouts(Rollouts):
    """The SCoRe experience source (module doc); prompt cursor, state and metrics are `Rollouts`'."""

    def __init__(self, run, cfg: RLConfig, score: ScoreConfig, records: Sequence[dict], *, seed: int = 0,
                 reward_fn=None):
        super().__init__(run, cfg, records, reward_fn=reward_fn, seed=seed)
        self.score = score

    def _sample(self, params, rng: jax.Array) -> dict[str, np.ndarray]:
        run, cfg, tok = self.run, self.cfg, self.run.tokenizer
        jax.block_until_ready(params)  # keep the step that made these params out of the sampling time
        t0 = time.perf_counter()
        chosen = self._chosen()
        fitted = [fit_prompt(prompts.get("policy").prompt(tok, r), cfg.max_prompt_len) for r in chosen]
        self.cut_prompts += sum(cut for _, cut in fitted)
        b = len(fitted) * cfg.group_size
        second_len, width = widths(tok, cfg)
        kw = dict(max_new=cfg.max_new_tokens, mesh=run.mesh, pad_id=tok.pad_id, vocab_limit=tok.vocab_size, rows=b)
        gen1 = Generator(run.model, params, max_prompt_len=cfg.max_prompt_len, **kw)
        gen2 = Generator(run.model, params, max_prompt_len=second_len, **kw)
        seed = int(jax.random.randint(rng, (), 0, 2**30))  # from the loop's (seed, step) stream
        episodes = two_turn(gen1, gen2, tok, [p for p, _ in fitted], k=cfg.group_size,
                            strategy=SamplingStrategy(temperature=cfg.temperature), seed=seed)
        arr = {"tokens": np.full((b, width), tok.pad_id, np.int32), "positions": np.zeros((b, width), np.int32),
               "segment_ids": np.zeros((b, width), np.int32), "turn_ids": np.zeros((b, width), np.int32)}
        per_row = {k: np.zeros(b, np.float32) for k in ("rewards_t1", "rewards_t2", "correct_t1", "correct_t2",
                                                       "identical", "stopped")}
        for row, ((first, c1, second, c2), record) in enumerate(
                zip(episodes, [r for r in chosen for _ in range(cfg.group_size)])):
            seq = second + c2.tokens
            arr["tokens"][row, :len(seq)] = seq
            arr["positions"][row, :len(seq)] = np.arange(len(seq))
            arr["segment_ids"][row, :len(seq)] = 1
            # Turn 1's sampled tokens: its EOS only if the sampler produced it.
            arr["turn_ids"][row, len(first):len(first) + len(c1.tokens)] = 1
            arr["turn_ids"][row, len(second):len(seq)] = 2
            y1, y2 = _body(c1.tokens, c1.stopped), _body(c2.tokens, c2.stopped)
            t1, t2 = tok.decode(y1), tok.decode(y2)
            per_row["rewards_t1"][row], per_row["rewards_t2"][row] = self.reward_fn(record, t1), self.reward_fn(record, t2)
            per_row["correct_t1"][row] = float(is_correct(t1, record["gold"]))
            per_row["correct_t2"][row] = float(is_correct(t2, record["gold"]))
            per_row["identical"][row] = float(y1 == y2)
            per_row["stopped"][row] = float(c1.stopped and c2.stopped)
        arr.update(per_row)
        arr["loss_mask"] = (arr["turn_ids"] > 0).astype(np.float32)
        s = self.score
        a1, a2 = turn_advantages(per_row["rewards_t1"], per_row["rewards_t2"], stage=s.stage, alpha=s.alpha,
                                 group_size=cfg.group_size, estimator=cfg.estimator, turn1_return=s.turn1_return)
        arr["adv_t1"], arr["adv_t2"] = np.asarray(a1, np.float32), np.asarray(a2, np.float32)
        return self._finish(arr, params, t0)
