"""LaTRO's experience: K rationales per question, then the gold answer scored after each, teacher-forced.

`LatroRollouts` is the experience source of the `latro` objective. Per step
it takes `batch_size / k` questions and samples K completions of each with
the jitted sampler (prefix shared, stopped at EOS, as the official code
samples), then cuts each at its first answer marker (`prompts.LATRO_STOPS`)
or EOS: that is the rationale z, and `stopped` says whether a marker or EOS
came before `latro.max_rationale_tokens`. The row is x + z + y, y the answer
format's gold answer string with its EOS:

    tokens, positions, segment_ids   [B, P + N + A]   prompt + rationale + answer + pad
    loss_mask                        [B, P + N + A]   1 on the rationale (the tokens the policy gradient trains)
    answer_mask                      [B, P + N + A]   1 on y (and, with answer_span=official, z's last token)
    advantages, rewards, elbo, kl, stopped, correct   [B]

One forward pass of the current params over those rows gives both
log pi(z|x) and the self-reward log pi(y|x, z); one of the frozen reference
gives log pi_0(z|x). `correct` grades the whole sample (the rationale and the
policy's own answer after it): logged, never rewarded. Resume is exact for
the reasons `Rollouts` gives.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from glore_jax import data, models, prompts, sharding as shd
from glore_jax.prompts import fit_prompt
from glore_jax.rl.config import LatroConfig
from glore_jax.rl.latro import latro_advantages, sequence, sequence_logprobs, truncate_rationale
from glore_jax.rl.rollouts import Rollouts
from glore_jax.sampling import Generator, SamplingStrategy, StopCondition
from glore_jax.tasks import is_correct


@functools.lru_cache(maxsize=8)
def _score_fn(config: models.ModelConfig, mesh: Mesh, temperature: float):
    def fn(params, batch):
        with shd.activation_rules(mesh):
            logits = models.apply(config, params, batch["tokens"], batch["positions"], batch["segment_ids"],
                                  want_values=False).logits
        return sequence_logprobs(logits, batch["tokens"], batch["loss_mask"], batch["answer_mask"], temperature)
    return jax.jit(fn)


class LatroRollouts(Rollouts):
    """The LaTRO experience source (module doc). It reads the frozen reference policy, so the loop hands
    it the current state's frozen trees (`reads_frozen`)."""

    reads_frozen = True

    def __init__(self, run, latro: LatroConfig, records: Sequence[dict], *, seed: int = 0):
        super().__init__(run, latro.sampling(), records, seed=seed)
        self.latro = latro
        tok = run.tokenizer
        self.stops = prompts.get(latro.answer_format).stop
        longest = max(len(prompts.latro_answer(tok, latro.answer_format, r["gold"], line_start=ls))
                      for r in self.records for ls in (False, True))
        self.answer_width = -(-longest // 8) * 8  # fixed per run, so the scoring pass compiles once
        self._frozen: dict[str, Any] = {}

    def next(self, params: Any, step: int, rng: jax.Array, frozen: dict[str, Any] | None = None) -> dict[str, Any]:
        self._frozen = frozen or {}
        return super().next(params, step, rng)

    def _sample(self, params, rng: jax.Array) -> dict[str, np.ndarray]:
        run, cfg, lt, tok = self.run, self.cfg, self.latro, self.run.tokenizer
        jax.block_until_ready(params)  # keep the step that made these params out of the sampling time
        t0 = time.perf_counter()
        chosen = self._chosen()
        fmt = prompts.get(lt.answer_format)
        fitted = [fit_prompt(fmt.prompt(tok, r), cfg.max_prompt_len) for r in chosen]
        self.cut_prompts += sum(cut for _, cut in fitted)
        b = len(fitted) * cfg.group_size
        gen = Generator(run.model, params, max_new=cfg.max_new_tokens, mesh=run.mesh, pad_id=tok.pad_id,
                        vocab_limit=tok.vocab_size, rows=b, max_prompt_len=cfg.max_prompt_len)
        seed = int(jax.random.randint(rng, (), 0, 2**31 - 1))  # from the loop's (seed, step) stream
        outs = gen.generate([p for p, _ in fitted], k=cfg.group_size,
                            strategy=SamplingStrategy(temperature=cfg.temperature),
                            stop=StopCondition(eos_id=tok.eos_id), seed=seed)
        width = cfg.max_prompt_len + cfg.max_new_tokens + self.answer_width
        arr = {k: np.zeros((b, width), np.int32) for k in ("tokens", "positions", "segment_ids")}
        arr["tokens"][:] = tok.pad_id
        arr["loss_mask"], arr["answer_mask"] = np.zeros((b, width), np.float32), np.zeros((b, width), np.float32)
        stopped, correct = np.zeros(b, bool), np.zeros(b, np.float32)
        row = 0
        for (prompt, _), record, group in zip(fitted, chosen, outs):
            for c in group:
                rationale, stopped[row] = truncate_rationale(tok, c.tokens, self.stops)
                answer = prompts.latro_answer(tok, lt.answer_format, record["gold"],
                                              line_start=tok.decode(rationale).endswith("\n"))
                seq, z_mask, y_mask = sequence(prompt, rationale, answer, lt.answer_span)
                n = len(seq)
                arr["tokens"][row, :n], arr["positions"][row, :n], arr["segment_ids"][row, :n] = seq, np.arange(n), 1
                arr["loss_mask"][row, :n], arr["answer_mask"][row, :n] = z_mask, y_mask
                text = tok.decode(c.tokens[:-1] if c.stopped else c.tokens)
                correct[row] = float(is_correct(text, record["gold"]))
                row += 1
        batch = data.put_local(run.mesh, {k: arr[k] for k in ("tokens", "positions", "segment_ids", "loss_mask",
                                                             "answer_mask")})
        score = _score_fn(run.model, run.mesh, cfg.temperature)
        lp, r = (np.asarray(x, np.float64) for x in score(params, batch))
        ref = np.asarray(score(self._frozen["reference"], batch)[0], np.float64) if "reference" in self._frozen \
            else lp  # beta = 0: no reference model, no KL
        adv, rewards = latro_advantages(r, lp, ref, stopped, cfg.group_size, lt.beta,
                                        non_stop_penalty=lt.non_stop_penalty,
                                        penalty_multiplier=lt.penalty_multiplier)
        arr.update(advantages=adv.astype(np.float32), rewards=rewards.astype(np.float32),
                   self_reward=r.astype(np.float32), kl=(lp - ref).astype(np.float32),
                   elbo=(rewards - lt.beta * (lp - ref)).astype(np.float32),
                   stopped=stopped.astype(np.float32), correct=correct)
        return self._finish(arr, params, t0)

    @property
    def stats(self) -> dict[str, Any]:
        out = super().stats
        out["limits"] = {"prompt_truncated": f"latro.max_prompt_len={self.cfg.max_prompt_len}",
                         "target_truncated": f"latro.max_rationale_tokens={self.cfg.max_new_tokens}"}
        return out
