"""Batched vs one-at-a-time rollouts: episodes/s and whether the predictions agree.

The same HotpotQA dev questions (FireAct's seeded shuffle), the built-in model, ReAct few-shot,
greedy, recorded search, three ways:

  batched            all episodes together (`--batch-size` rows per step), continuous batching,
                     each episode's previous turns reused from the KV store, the few-shot
                     exemplars held and attended once for all rows: our configuration
  one-at-a-time+kv   each episode alone (batch 1), same KV store (a lone row copies the exemplars
                     from it): isolates what batching adds
  one-at-a-time      each episode alone, every prompt prefilled in full: the naive baseline

Greedy decoding should give the same predictions every way; a difference points at float noise
on near-ties (padding and batch shape change the order of float sums).

    python benchmarks/rollouts.py                        # 32 questions, max_turns 8 (~4.5 min on 2 idle cores)
    python benchmarks/rollouts.py --n 4 --max-turns 2    # check that it runs

Needs FIREACT_DATA_DIR (the FireAct data); the model is converted into $FIREACT_CACHE on first use.
"""

from __future__ import annotations

import argparse
import time


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=32, help="questions (first n of eval_indices(task, n))")
    ap.add_argument("--max-turns", type=int, default=8, help="Thought/Action steps per episode")
    ap.add_argument("--batch-size", type=int, default=32, help="rows per generate call in the batched run")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="tokens per step (default: AgentParams')")
    ap.add_argument("--model", default="smollm2-135m", help="model spec (alias, path or HF id)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: torch's choice; 1 is far faster on a CPU other jobs share)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    # Heavy imports here so that --help is instant.
    from fireact_utils.agent import run_episodes
    from fireact_utils.config import AgentParams, ModelParams
    from fireact_utils.llm import LocalBackend
    from fireact_utils.tasks import eval_indices, load_task
    from fireact_utils.tools import RecordedSearch

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    task = load_task("hotpotqa", "dev")
    indices = eval_indices(task, args.n)
    search = RecordedSearch()
    mp = ModelParams(name=args.model, device=args.device)
    llm = LocalBackend(mp, batch_size=args.batch_size)
    extra = {"max_new_tokens": args.max_new_tokens} if args.max_new_tokens else {}
    params = AgentParams(method="react", mode="fewshot", temperature=0.0, max_turns=args.max_turns,
                         batch_size=args.batch_size, **extra)
    llm.generate(["Warm-up:"], [], max_new_tokens=2)  # first-call costs (kernels, allocator) off the clock

    def timed(backend: LocalBackend, one_at_a_time: bool) -> tuple[float, list[dict]]:
        t0 = time.perf_counter()
        if one_at_a_time:
            recs = [r for i in indices for r in run_episodes(task, [i], backend, search, params, progress=False)]
        else:
            recs = run_episodes(task, indices, backend, search, params, progress=False)
        return time.perf_counter() - t0, recs

    def share(**kw) -> LocalBackend:  # another backend on the same weights
        return LocalBackend(mp, model=llm.model, tokenizer=llm.tok, **kw)

    runs = [("batched", args.batch_size, llm, False), ("one-at-a-time+kv", 1, share(batch_size=1), True),
            ("one-at-a-time", 1, share(batch_size=1, prefix_cache=False), True)]
    results = [(name, bs, backend, *timed(backend, single)) for name, bs, backend, single in runs]

    n = len(indices)
    print(f"\nReAct few-shot, {args.model}, HotpotQA dev n={n}, max_turns={args.max_turns}, "
          f"max_new_tokens={params.max_new_tokens}, device={llm.model.device}, threads={_threads()}")
    print(f"{'mode':<17} {'batch':>5} {'seconds':>8} {'episodes/s':>10} {'EM':>3} {'finished':>8} "
          f"{'prompt tok':>10} {'from cache':>10} {'same pred':>9}")
    base = results[0][4]
    for name, bs, backend, secs, recs in results:
        em = sum(r["em"] for r in recs)
        fin = sum(r["status"] == "finished" for r in recs)
        same = sum(a["pred"] == b["pred"] for a, b in zip(base, recs, strict=True))
        d = backend.decoder
        hit = d.cached_prompt_tokens / max(d.prompt_tokens, 1)
        print(f"{name:<17} {bs:>5} {secs:>8.1f} {n / secs:>10.3f} {em:>3} {fin:>8} "
              f"{d.prompt_tokens:>10} {hit:>10.0%} {same:>6}/{n}")
    t = {name: secs for name, _, _, secs, _ in results}
    speedup = t["one-at-a-time"] / t["batched"]
    print(f"speed-up, batched vs one-at-a-time: {speedup:.2f}x "
          f"(vs one-at-a-time+kv: {t['one-at-a-time+kv'] / t['batched']:.2f}x)")
    agree = sum(a["pred"] == b["pred"] for a, b in zip(results[0][4], results[2][4], strict=True))
    print(f"identical predictions, batched vs one-at-a-time: {agree}/{n}")
    return {"n": n, "seconds": t, "speedup": speedup, "agree": agree}


def _threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    main()
