"""Sampler throughput against transformers' generate, a no-cache baseline, and naive rollouts.

    python benchmarks/sampling.py --quick --out sampling.json

Everything is measured side by side in one run, on the `demo` preset (`--preset`) with
random weights exported to a `transformers` LlamaForCausalLM (same weights,
float32, greedy, KV cache on, same batch and lengths). The headline
`decode_speedup_vs_hf` is float32 against float32, the minimum over batch
32 and 64; a bf16-against-bf16 row at batch 32 is reported beside it
(`decode_bf16`). Each figure is the
fastest of several timed runs after a warm-up (compilation is excluded for
JAX; HF has none), ours and HF alternating run by run; each batch also gives the run-by-run pairs'
speedup with a 95% interval (`paired_speedup_vs_hf`). `transformers` runs in a child process: merely importing
torch in the JAX process slowed XLA:CPU decoding by up to 40% here (its
OpenMP runtime competes with XLA's thread pool), which would flatter neither.
Where JAX runs on a GPU, HF runs on the same GPU (`common.torch_setup`: float32 in
TF32 on both sides, XLA's default there).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from benchmarks import tunix_peer  # noqa: E402
from benchmarks.common import best_time, cpu_info, matmul_gflops, save, torch_device, torch_setup  # noqa: E402
from glore_jax import convert  # noqa: E402
from glore_jax import hardware  # noqa: E402
from glore_jax import models as M  # noqa: E402
from glore_jax import sampling as S  # noqa: E402
from glore_jax import sharding as shd  # noqa: E402
from glore_jax.recipe.stats import mean_ci  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
GSM8K_TEST = ROOT.parent / "shared" / "data" / "gsm8k" / "test.jsonl"
TOKENIZER = ROOT.parent / "shared" / "tokenizers" / "mistral-7b-v0.1" / "tokenizer.model"


def _prompts(rng, batch, length, vocab):
    return rng.integers(3, vocab, (batch, length)).astype(np.int32)


def gsm8k_prefix_lengths(n: int) -> list[int]:
    """Token lengths of real GSM8K question + half-solution prefixes (LLaMA-2 tokenizer scheme)."""
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(TOKENIZER))
    lengths = []
    with open(GSM8K_TEST) as f:
        for line in f:
            ex = json.loads(line)
            steps = ex["answer"].split("\n")
            prefix = ex["question"] + "\n" + "\n".join(steps[: max(1, len(steps) // 2)])
            lengths.append(len(sp.encode(prefix)) + 1)
            if len(lengths) == n:
                break
    return lengths


def weight_matmul_flops(cfg, batch: int, prompt_len: int, new: int) -> float:
    """The weight matmuls' FLOPs that a generate call cannot skip: 2 x the weight matrices each token needs.

    Every layer but the last runs at every prompt token; the last layer's keys
    and values are needed at every prompt token, its query, out-projection and
    MLP and the LM head only at the last one (whose logits choose the first new
    token); then each of the new - 1 fed tokens runs every matrix, the LM head
    included. Attention, softmax, norms, the embedding lookup and sampling are
    left out, so time = FLOPs / matmul peak is a lower bound for *any*
    implementation on this machine, and HF time / that bound is an upper bound
    on the speedup over HF that any sampler could show here. (Until 2026-12-04
    every matrix counted at every prompt token, which a sampler need not do and
    ours does not since fc740ca: 1.17x this count at 32 + 32 tokens, 1.06x at
    32 + 128, so the `bound` and `of peak` columns read 1.17x low and high.)
    """
    c = cfg
    kv = 2 * c.embed_dim * c.num_kv_heads * c.head_dim
    layer = c.embed_dim * c.head_dim * 2 * (c.num_heads + c.num_kv_heads) + 3 * c.embed_dim * c.mlp_dim
    lm_head = c.embed_dim * c.vocab_size
    prefill = prompt_len * ((c.num_layers - 1) * layer + kv) + (layer - kv) + lm_head
    return 2.0 * batch * (prefill + (new - 1) * (c.num_layers * layer + lm_head))


def _sampler(cfg, rows: int):
    """The sampler a pipeline stage builds: on the mesh over every device (two on a multi-core CPU host
    unless GLORE_JAX_CPU_DEVICES says otherwise), rows split across them; one device where `rows` does not split."""
    mesh = shd.make_mesh()
    return S.sampler_for(cfg, mesh if rows % mesh.devices.size == 0 else shd.single_device_mesh())


def ours_decode(cfg, params, batch, prompt_len, new):
    """One call of our sampler on the benchmark's prompts of `batch` rows (greedy, `new` tokens)."""
    sampler = _sampler(cfg, batch)
    toks = _prompts(np.random.default_rng(batch), batch, prompt_len, cfg.vocab_size)
    lens = np.full((batch,), prompt_len, np.int32)
    return lambda: sampler.sample(params, toks, lens, max_new=new, strategy=S.SamplingStrategy(),
                                  stop=S.StopCondition()).tokens.block_until_ready()


def paired_speedup(ratios) -> dict:
    """Run-by-run speedups (HF's time over ours, each pair timed a second apart): their geometric mean and
    its Student-t 95% interval, on log ratios. The headline ratio is fastest over fastest; this says how
    far the pairs spread around it, which a ratio near a bar needs."""
    mean, lo, hi = mean_ci(np.log(np.asarray(ratios, np.float64)))
    return {"geomean": math.exp(mean), "ci95": [math.exp(lo), math.exp(hi)], "runs": len(ratios)}


def bench_decode_vs_hf(cfg, params, hf_dir, cases, prompt_len, new, repeats) -> dict[tuple[int, str], tuple]:
    """(ours, HF) decode tokens/s per (batch, dtype) case, the two alternating run by run, and the
    pairs' speedups (`paired_speedup`).

    HF runs in a child process (see the module doc) that stays up and runs one
    `generate` per request, so each repeat times ours and then HF within a
    second or two of each other: this machine's speed drifts by 10-35% within
    the hour, and timing all of ours before all of HF let that drift into the ratio.
    Each side's timed run follows an untimed run of the same side (see the loop).
    """
    job = json.dumps({"hf_dir": hf_dir, "vocab": cfg.vocab_size, "cases": list(cases), "prompt_len": prompt_len,
                      "new": new, "device": torch_device(jax.devices()[0].platform)})
    worker = subprocess.Popen([sys.executable, __file__, "--hf_worker", job], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)

    def hf_once(case) -> float:
        worker.stdin.write(json.dumps(case) + "\n")
        worker.stdin.flush()
        while not (line := worker.stdout.readline()).startswith("seconds "):  # skip anything a library prints
            if not line:
                raise RuntimeError("the HF worker exited (its error is above)")
        return float(line.split()[1])

    out = {}
    try:
        for batch, dtype in cases:
            ours = ours_decode(cfg.replace(dtype=dtype), params, batch, prompt_len, new)
            ours(), hf_once((batch, dtype))  # compile / warm up
            best, pairs = [float("inf")] * 2, []
            for _ in range(repeats):
                # Each timed run follows an untimed one of its own side, not the other side's run: right
                # after HF's child ran, our call took ~5% longer (its caches and cores just used by the
                # other process; batch 64 quick, demo preset, 2-core Zen 5), while HF's time did not depend
                # on what ran before it. Both sides are timed warm, as a stage's back-to-back calls run.
                ours()
                t0 = time.perf_counter()
                ours()
                t_ours = time.perf_counter() - t0
                hf_once((batch, dtype))
                t_hf = hf_once((batch, dtype))
                best = [min(best[0], t_ours), min(best[1], t_hf)]
                pairs.append(t_hf / t_ours)
            out[batch, dtype] = (batch * new / best[0], batch * new / best[1], paired_speedup(pairs))
    finally:
        worker.stdin.close()
        worker.wait()
    return out


def bench_decode_layouts(cfg, params, cases: dict[str, tuple[int, int, int]], repeats) -> dict | None:
    """Decode tokens/s of the three layouts a CPU host can run, interleaved in one loop (None on one device).

    data_parallel: weights replicated, one while_loop per device (the default for a small model);
    spmd_fsdp: weights split over 'fsdp' as in training, one SPMD loop over all rows;
    one_device: everything on the first device.
    `cases`: name -> (rows, prompt width, new tokens); prompts fill 60-100% of the width.
    """
    mesh = shd.make_mesh()
    if mesh.devices.size == 1:
        return None
    samplers = {"data_parallel": S.Sampler(cfg, mesh=mesh, independent_rows=True),
                "spmd_fsdp": S.Sampler(cfg, mesh=mesh, independent_rows=False),
                "one_device": S.Sampler(cfg, mesh=shd.single_device_mesh())}
    out = {}
    for case, (b, width, new) in cases.items():
        rng = np.random.default_rng(b)
        toks = _prompts(rng, b, width, cfg.vocab_size)
        lens = rng.integers(int(0.6 * width), width + 1, b).astype(np.int32)
        runs = {name: (lambda s=s: s.sample(params, toks, lens, max_new=new, strategy=S.SamplingStrategy(),
                                            stop=S.StopCondition()).tokens.block_until_ready())
                for name, s in samplers.items()}
        for run in runs.values():
            run()  # compile
        best = dict.fromkeys(runs, float("inf"))
        for _ in range(repeats):
            for name, run in runs.items():
                t0 = time.perf_counter()
                run()
                best[name] = min(best[name], time.perf_counter() - t0)
        out[case] = {"rows": b, "prompt_width": width, "new_tokens": new,
                     **{name: b * new / t for name, t in best.items()}}
    return out


def _hf_worker(job: str) -> None:
    """Child process: for each request line `[batch, dtype]` on stdin, one timed HF `generate`; seconds on stdout."""
    import torch
    import transformers
    job = json.loads(job)
    device = job["device"]
    sync = torch_setup(torch, device)
    models = {dtype: transformers.AutoModelForCausalLM.from_pretrained(job["hf_dir"], dtype=getattr(torch, dtype))
              .to(device).eval() for dtype in sorted({d for _, d in job["cases"]})}
    for line in sys.stdin:
        batch, dtype = json.loads(line)
        toks = torch.tensor(_prompts(np.random.default_rng(batch), batch, job["prompt_len"], job["vocab"]),
                            dtype=torch.long, device=device)
        sync()
        t0 = time.perf_counter()
        with torch.no_grad():
            models[dtype].generate(input_ids=toks, attention_mask=torch.ones_like(toks), max_new_tokens=job["new"],
                                   min_new_tokens=job["new"], do_sample=False, use_cache=True, pad_token_id=0,
                                   eos_token_id=None)
        sync()
        print("seconds", time.perf_counter() - t0, flush=True)


def bench_no_cache(cfg, params, batch, prompt_len, new, repeats):
    """Greedy decoding that recomputes the full forward over a fixed buffer every step."""
    total = prompt_len + new

    @jax.jit
    def loop(params, buf):
        def body(i, buf):
            logits = M.apply(cfg, params, buf, want_values=False).logits
            nxt = jnp.argmax(jax.lax.dynamic_index_in_dim(logits, prompt_len + i - 1, 1, False), -1)
            return jax.lax.dynamic_update_index_in_dim(buf, nxt.astype(buf.dtype), prompt_len + i, 1)
        return jax.lax.fori_loop(0, new, body, buf)

    buf = np.zeros((batch, total), np.int32)
    buf[:, :prompt_len] = _prompts(np.random.default_rng(batch), batch, prompt_len, cfg.vocab_size)
    return batch * new / best_time(lambda: loop(params, buf).block_until_ready(), repeats)


def bench_prefill(cfg, params, batch, length, repeats):
    sampler = _sampler(cfg, batch)
    toks = _prompts(np.random.default_rng(0), batch, length, cfg.vocab_size)
    lens = np.full((batch,), length, np.int32)
    run = lambda: sampler.prefill(params, sampler.put_rows(toks), sampler.put_rows(lens))[1].block_until_ready()
    return batch * length / best_time(run, repeats)


def bench_rollouts(cfg, params, n, k, new, repeats):
    lengths = gsm8k_prefix_lengths(n)
    width = S.bucket(max(lengths))
    rng = np.random.default_rng(0)
    toks = np.zeros((n, width), np.int32)
    for i, l in enumerate(lengths):
        toks[i, :l] = rng.integers(3, cfg.vocab_size, l)
    lens = np.asarray(lengths, np.int32)
    sampler = _sampler(cfg, n * k)
    strat = S.SamplingStrategy(temperature=1.0)

    def run(share):
        return lambda: sampler.rollouts(params, toks, lens, k=k, max_new=new, strategy=strat,
                                        stop=S.StopCondition(), share_prefix=share).tokens.block_until_ready()
    shared, naive = best_time(run(True), repeats), best_time(run(False), repeats)
    return {"n_prefixes": n, "k": k, "new_tokens": new, "prefix_len_mean": float(np.mean(lengths)),
            "prefix_len_bucket": width, "shared_s": shared, "naive_s": naive,
            "prefix_sharing_speedup": naive / shared}


def bench_tunix(cfg, params, batches, prompt_len, new, repeats) -> dict:
    """tunix's sampler on the same weights and prompts (`tunix_peer`).

    tunix 0.1.7's Llama-3 attention ignores `config.rope_theta` (it always
    rotates with 1e6), so both sides run a rope_theta=1e6 copy of the model
    here: decode speed does not depend on theta, and the greedy check needs
    the same function on both sides.
    """
    tcfg = cfg.replace(rope_theta=1_000_000.0)
    prompts = {b: _prompts(np.random.default_rng(b), b, prompt_len, cfg.vocab_size) for b in batches}
    check = prompts[8] if 8 in prompts else next(iter(prompts.values()))
    greedy = S.sampler_for(tcfg).sample(params, check, np.full((len(check),), prompt_len, np.int32), max_new=new,
                                        strategy=S.SamplingStrategy(), stop=S.StopCondition())
    with tempfile.TemporaryDirectory() as d:
        convert.to_hf(tcfg, params, d)
        ours = {b: ours_decode(tcfg, params, b, prompt_len, new) for b in prompts}
        return tunix_peer.bench_decode(d, tcfg, {len(check): check, **prompts}, new, repeats,
                                       np.asarray(greedy.tokens)[:, :new], ours)


def main():
    # Both sides (the torch/HF child processes inherit it) run with the malloc the command lines use.
    hardware.reexec_with_launch_env()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repeats and tokens (< 5 min on 2 cores)")
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    ap.add_argument("--preset", default="demo",
                    help="model preset (`models` presets; the demo pipeline samples with `mini`)")
    ap.add_argument("--hf_worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.hf_worker:
        return _hf_worker(args.hf_worker)

    repeats = 5 if args.quick else 9
    prompt_len, new = 32, (32 if args.quick else 128)
    batches = (1, 8, 32, 64)
    cfg = M.preset(args.preset)
    params = M.init_params(cfg, jax.random.key(0))
    results = {"preset": args.preset, "params_m": cfg.num_params() / 1e6, "prompt_len": prompt_len,
               "new_tokens": new, "device": str(jax.devices()[0]), "device_kind": jax.devices()[0].device_kind,
               "torch_device": torch_device(jax.devices()[0].platform), "devices": len(jax.devices()), **cpu_info(),
               "jax": jax.__version__,
               "prefill_tokens_per_s": bench_prefill(cfg, params, 8, 256, repeats), "decode": {}}
    nocache = {b: bench_no_cache(cfg, params, b, prompt_len, new, repeats) for b in batches}
    with tempfile.TemporaryDirectory() as d:
        convert.to_hf(cfg, params, d)
        # bf16 compute (what the dtype rule picks on native-bf16 CPUs), both frameworks, batch 32 only.
        both = bench_decode_vs_hf(cfg, params, d, [(b, "float32") for b in batches] + [(32, "bfloat16")],
                                  prompt_len, new, repeats)
    ours = {b: both[b, "float32"][0] for b in batches}
    ours_bf16 = both[32, "bfloat16"][0]
    hf = {case: rates[1] for case, rates in both.items()}
    for b in batches:
        results["decode"][str(b)] = {"tokens_per_s": ours[b], "hf_tokens_per_s": hf[b, "float32"],
                                     "no_cache_tokens_per_s": nocache[b],
                                     "decode_speedup_vs_hf": ours[b] / hf[b, "float32"],
                                     "paired_speedup_vs_hf": both[b, "float32"][2],
                                     "speedup_vs_no_cache": ours[b] / nocache[b]}
    # How close each side runs to this machine's float32 matmul rate, measured in this run (see
    # `weight_matmul_flops`): what bounds the speedup any sampler could reach over HF here.
    peak = matmul_gflops("float32", repeats) * 1e9
    results["matmul_peak_gflops_float32"] = peak / 1e9
    for b in batches:
        r, floor = results["decode"][str(b)], weight_matmul_flops(cfg, b, prompt_len, new) / peak
        r.update(floor_s=floor, fraction_of_matmul_peak=floor * ours[b] / (b * new),
                 hf_fraction_of_matmul_peak=floor * hf[b, "float32"] / (b * new),
                 max_speedup_vs_hf=(b * new / hf[b, "float32"]) / floor)
    # The headline is the worst case over the large batches (the ones RL and SORM labelling run).
    results["decode_speedup_vs_hf"] = min(results["decode"][b]["decode_speedup_vs_hf"] for b in ("32", "64"))
    results["decode_speedup_vs_tunix"] = None  # null where tunix does not install (the `bench` extra)
    try:
        # A peer that installs but breaks (tunix 0.1.7 pins older jax/flax/safetensors than some images carry)
        # is reported, not allowed to lose the run's other figures.
        results["tunix"] = bench_tunix(cfg, params, batches, prompt_len, new, repeats) if tunix_peer.available() else None
    except Exception as e:  # noqa: BLE001
        results["tunix"], results["tunix_error"] = None, f"{type(e).__name__}: {str(e)[:500]}"
        print(f"tunix sampler failed: {results['tunix_error']}")
    if results["tunix"]:
        for b in batches:
            results["decode"][str(b)]["tunix_tokens_per_s"] = results["tunix"]["tokens_per_s"][b]
            # Against ours timed beside tunix, alternately (`tunix_peer.bench_decode`).
            results["decode"][str(b)]["decode_speedup_vs_tunix"] = (results["tunix"]["ours_tokens_per_s"][b]
                                                                    / results["tunix"]["tokens_per_s"][b])
            results["decode"][str(b)]["paired_speedup_vs_tunix"] = paired_speedup(results["tunix"]["pair_speedups"][b])
        results["decode_speedup_vs_tunix"] = min(results["decode"][b]["decode_speedup_vs_tunix"] for b in ("32", "64"))
    results["decode_bf16"] = {"32": {"tokens_per_s": ours_bf16, "hf_tokens_per_s": hf[32, "bfloat16"],
                                     "decode_speedup_vs_hf": ours_bf16 / hf[32, "bfloat16"]}}
    results["rollouts"] = bench_rollouts(cfg, params, n=4, k=8, new=new, repeats=repeats)
    # The benchmark's shapes, and the demo pipeline's sampling calls (glore.sample_rows=64, max_prompt_len=224,
    # max_new_tokens=96), where longer prompts and attention spans change which layout wins.
    layout_cases = {**{str(b): (b, prompt_len, new) for b in (8, 32, 64)}, "pipeline_64x224+96": (64, 224, 96)}
    results["decode_layouts"] = bench_decode_layouts(cfg, params, layout_cases, repeats)
    results["prefix_sharing_speedup"] = results["rollouts"]["prefix_sharing_speedup"]

    print(f"{args.preset} preset ({results['params_m']:.1f}M params), prompt {prompt_len}, {new} new tokens, "
          f"{results['device']}, {results['cpu']} (family {results.get('cpu_family')} model {results.get('cpu_model_id')}, {os.cpu_count()} CPUs, native bf16: {results['native_bf16']})")
    print(f"prefill: {results['prefill_tokens_per_s']:,.0f} tokens/s (batch 8 x 256)")
    print(f"float32 matmul peak {results['matmul_peak_gflops_float32']:.0f} GFLOP/s; 'bound': the speedup over HF "
          f"of a sampler that ran, at that peak, only the weight matmuls no sampler can skip")
    print(f"{'batch':>5} {'ours tok/s':>11} {'HF tok/s':>10} {'no-cache':>10} {'vs HF':>7} {'of peak':>8} "
          f"{'HF peak':>8} {'bound':>7}  pairs: geomean (95% CI)")
    for b, r in results["decode"].items():
        pair = r["paired_speedup_vs_hf"]
        print(f"{b:>5} {r['tokens_per_s']:>11,.0f} {r['hf_tokens_per_s']:>10,.0f} "
              f"{r['no_cache_tokens_per_s']:>10,.0f} {r['decode_speedup_vs_hf']:>6.2f}x "
              f"{r['fraction_of_matmul_peak']:>8.0%} {r['hf_fraction_of_matmul_peak']:>8.0%} "
              f"{r['max_speedup_vs_hf']:>6.2f}x  {pair['geomean']:.2f}x ({pair['ci95'][0]:.2f}-{pair['ci95'][1]:.2f})")
    r = results["decode_bf16"]["32"]
    print(f"{'32 bf16':>5} {r['tokens_per_s']:>9,.0f} {r['hf_tokens_per_s']:>10,.0f} {'':>10} "
          f"{r['decode_speedup_vs_hf']:>6.2f}x")
    if results["tunix"]:
        print(f"tunix sampler, same weights (greedy tokens agree: {results['tunix']['greedy_token_agreement']:.0%}): " +
              ", ".join(f"batch {b} {r['tunix_tokens_per_s']:,.0f} tok/s against ours "
                        f"{results['tunix']['ours_tokens_per_s'][int(b)]:,.0f} ({r['decode_speedup_vs_tunix']:.2f}x; pairs "
                        f"{r['paired_speedup_vs_tunix']['geomean']:.2f}x, 95% CI {r['paired_speedup_vs_tunix']['ci95'][0]:.2f}-"
                        f"{r['paired_speedup_vs_tunix']['ci95'][1]:.2f})"
                        for b, r in results["decode"].items()))
    if results["decode_layouts"]:
        print(f"decode layouts on {results['devices']} devices, tokens/s (interleaved): " + "; ".join(
            f"{b}: " + ", ".join(f"{k} {v:,.0f}" for k, v in r.items() if k in ("data_parallel", "spmd_fsdp",
                                                                                  "one_device"))
            for b, r in results["decode_layouts"].items()))
    ro = results["rollouts"]
    print(f"rollouts N={ro['n_prefixes']} K={ro['k']} (GSM8K prefixes, mean {ro['prefix_len_mean']:.0f} tokens): "
          f"shared {ro['shared_s']:.3f}s, naive {ro['naive_s']:.3f}s, speedup {ro['prefix_sharing_speedup']:.2f}x")
    save(results, args.out)


if __name__ == "__main__":
    main()
