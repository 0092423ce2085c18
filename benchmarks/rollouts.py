"""Batched vs one-at-a-time rollouts: episodes/s and whether the predictions agree.

The same HotpotQA dev questions (FireAct's seeded shuffle), the built-in model, ReAct few-shot,
greedy, recorded search. "batched" runs all episodes together (`batch_size` rows per generate
call); "one-at-a-time" runs each episode alone with batch size 1. Greedy decoding should give the
same predictions both ways; a difference points at padding (or float noise on near-ties).

    python benchmarks/rollouts.py                        # 32 questions, max_turns 8: long on a CPU
    python benchmarks/rollouts.py --n 4 --max-turns 2    # check that it runs (~10 min on 2 busy cores)
    python benchmarks/rollouts.py --n 4 --max-turns 2 --threads 1   # the same, on a CPU other jobs share

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
    llm = LocalBackend(ModelParams(name=args.model, device=args.device), batch_size=args.batch_size)
    extra = {"max_new_tokens": args.max_new_tokens} if args.max_new_tokens else {}
    params = AgentParams(method="react", mode="fewshot", temperature=0.0, max_turns=args.max_turns,
                         batch_size=args.batch_size, **extra)
    llm.generate(["Warm-up:"], [], max_new_tokens=2)  # first-call costs (kernels, allocator) off the clock

    t0 = time.perf_counter()
    batched = run_episodes(task, indices, llm, search, params, progress=False)
    t_batched = time.perf_counter() - t0

    llm.batch_size = 1
    t0 = time.perf_counter()
    single = [rec for i in indices for rec in run_episodes(task, [i], llm, search, params, progress=False)]
    t_single = time.perf_counter() - t0

    n = len(indices)
    agree = sum(a["pred"] == b["pred"] for a, b in zip(batched, single, strict=True))
    rows = [("batched", args.batch_size, t_batched, batched), ("one-at-a-time", 1, t_single, single)]
    print(f"\nReAct few-shot, {args.model}, HotpotQA dev n={n}, max_turns={args.max_turns}, "
          f"max_new_tokens={params.max_new_tokens}, device={llm.model.device}, threads={_threads()}")
    print(f"{'mode':<14} {'batch':>5} {'seconds':>9} {'episodes/s':>11} {'EM':>5} {'finished':>9}")
    for name, bs, secs, recs in rows:
        em = sum(r["em"] for r in recs)
        fin = sum(r["status"] == "finished" for r in recs)
        print(f"{name:<14} {bs:>5} {secs:>9.1f} {n / secs:>11.3f} {em:>5} {fin:>9}")
    speedup = t_single / t_batched
    print(f"speed-up (batched / one-at-a-time episodes/s): {speedup:.2f}x")
    print(f"identical predictions: {agree}/{n}")
    return {"n": n, "batched_s": t_batched, "single_s": t_single, "speedup": speedup, "agree": agree}


def _threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    main()
