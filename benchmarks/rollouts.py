"""Our decoder against what a user would pick instead: episodes/s and identical predictions.

The same HotpotQA dev questions (FireAct's seeded shuffle), the built-in model, ReAct few-shot,
greedy, recorded search, side by side in one run:

  ours               `LocalBackend`: all episodes together (`--batch-size` rows), continuous
                     batching, each episode's previous turns reused from the KV store, the
                     few-shot exemplars held and attended once for all rows
  generate           transformers' batched `model.generate` per turn (`llm.GenerateBackend`: left
                     padding, a row stops at the kit's stops, checked on its text each step)
  generate_batch     transformers' continuous batching (`model.generate_batch`) per turn; it
                     knows only EOS, so each turn runs to max_new_tokens and is cut after
  one-at-a-time+kv   ours, each episode alone (batch 1): isolates what batching adds
  one-at-a-time      ours alone, every prompt prefilled in full: the naive baseline
  vllm               the model on a vLLM server (`llm.VLLMBackend`, .venv-vllm): turns sent as the
                     turn before ends, continuous batching and prefix caching in the engine; its
                     start-up is timed apart (paid once per model served)

The library paths run turn by turn (all unfinished episodes generate together, as the kit's
agent loop does for any non-streaming backend). Greedy decoding should give the same predictions
every way; a difference points at float noise on near-ties (padding and batch shape change the
order of float sums). The verdict line is the ratio of ours to the best library path.

    python benchmarks/rollouts.py                        # 32 questions, max_turns 8 (~4.5 min on 2 idle cores)
    python benchmarks/rollouts.py --n 4 --max-turns 2    # check that it runs
    python benchmarks/rollouts.py --trained outputs/runs/cpu/finetune/final   # the fine-tuned agent
    python benchmarks/rollouts.py --trained outputs/runs/cpu/finetune/final --vs-fewshot --n-exemplars 1 \
        --skip generate_batch one-at-a-time+kv one-at-a-time   # its cost against prompting, both decoders

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
    ap.add_argument("--trained", default=None,
                    help="what fine-tuning wrote (finetune/final): run the fine-tuned agent (short prompts, long generations)")
    ap.add_argument("--vs-fewshot", action="store_true",
                    help="with --trained: also run few-shot ReAct of the base model (ours) on the same questions "
                         "and compare the two agents' cost per episode and per correct answer")
    ap.add_argument("--n-exemplars", type=int, default=None, help="few-shot exemplars (default: AgentParams'; the demo uses 1)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--skip", nargs="*", default=[], help="runs to leave out (e.g. one-at-a-time generate_batch)")
    ap.add_argument("--vllm-args", nargs="*", default=[],
                    help="extra vLLM server arguments (model.vllm_args), e.g. --vllm-args=--enforce-eager")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: torch's choice; 1 is far faster on a CPU other jobs share)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.vs_fewshot and not args.trained:
        raise SystemExit("error: --vs-fewshot compares the fine-tuned agent (--trained) with prompting")
    # Heavy imports here so that --help is instant.
    from fireact_utils.agent import run_episodes
    from fireact_utils.config import AgentParams, ModelParams
    from fireact_utils.llm import GenerateBackend, LocalBackend
    from fireact_utils.tasks import eval_indices, load_task
    from fireact_utils.tools import RecordedSearch

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    task = load_task("hotpotqa", "dev")
    indices = eval_indices(task, args.n)
    search = RecordedSearch()
    mp = ModelParams(name=args.model, device=args.device)
    if args.trained:
        from fireact_utils.train import adapter_model_params

        mp = adapter_model_params(mp, args.trained)
    llm = LocalBackend(mp, batch_size=args.batch_size)
    extra = {"max_new_tokens": args.max_new_tokens} if args.max_new_tokens else {}
    if args.n_exemplars:
        extra["n_exemplars"] = args.n_exemplars
    params = AgentParams(method="react", mode="finetuned" if args.trained else "fewshot", temperature=0.0,
                         max_turns=args.max_turns, batch_size=args.batch_size, **extra)
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

    runs = [("ours", args.batch_size, llm, False),
            ("generate", args.batch_size, GenerateBackend(mp, args.batch_size, llm.model, llm.tok), False),
            ("vllm", args.batch_size, None, False),  # started when its turn comes, stopped after
            ("generate_batch", args.batch_size, HFContinuous(llm.model, llm.tok), False),
            ("one-at-a-time+kv", 1, share(batch_size=1), True),
            ("one-at-a-time", 1, share(batch_size=1, prefix_cache=False), True)]
    results = []
    for name, bs, backend, single in runs:
        if name not in args.skip:
            backend = backend or vllm_backend(mp, args)
            results.append((name, bs, backend, *timed(backend, single)))
            if name == "vllm":  # an idle engine still polls: keep it off the other runs' cores
                from fireact_utils.serving import stop_all

                stop_all()
            print(f"[{name}: {results[-1][3]:.1f} s]", flush=True)  # progress, in case a later run is killed

    n = len(indices)
    print(f"\nReAct {params.mode} ({params.n_exemplars} exemplars if few-shot), {llm.name}, HotpotQA dev n={n}, "
          f"max_turns={args.max_turns}, "
          f"max_new_tokens={params.max_new_tokens}, device={llm.model.device}, threads={_threads()}")
    print(f"{'mode':<17} {'batch':>5} {'seconds':>8} {'episodes/s':>10} {'EM':>3} {'finished':>8} "
          f"{'prompt tok':>10} {'from cache':>10} {'same pred':>9}")
    base = results[0][4]
    for name, bs, backend, secs, recs in results:
        em = sum(r["em"] for r in recs)
        fin = sum(r["status"] == "finished" for r in recs)
        same = sum(a["pred"] == b["pred"] for a, b in zip(base, recs, strict=True))
        prompt_tokens = sum(r["prompt_tokens"] for r in recs)
        d = getattr(backend, "decoder", None)
        hit = f"{d.cached_prompt_tokens / max(d.prompt_tokens, 1):>10.0%}" if d else f"{'-':>10}"
        print(f"{name:<17} {bs:>5} {secs:>8.1f} {n / secs:>10.3f} {em:>3} {fin:>8} "
              f"{prompt_tokens:>10} {hit} {same:>6}/{n}")
    t = {name: secs for name, _, _, secs, _ in results}
    out = {"n": n, "seconds": t}
    library = {k: v for k, v in t.items() if k in ("generate", "generate_batch")}
    if library:
        best = min(library, key=library.get)
        by_name = {name: recs for name, _, _, _, recs in results}
        same = sum(a["pred"] == b["pred"] for a, b in zip(by_name["ours"], by_name["generate"], strict=True)) \
            if "generate" in by_name else None
        out.update(ratio=library[best] / t["ours"], best_library=best, same_as_generate=same)
        print(f"ours vs the best library path ({best}): {out['ratio']:.2f}x episodes/s; "
              f"predictions identical to model.generate's: {same}/{n}")
    if "vllm" in t:
        by_name = {name: recs for name, _, _, _, recs in results}
        out.update(vllm_ratio=t["ours"] / t["vllm"], vllm_start_s=VLLM_START_S[-1],
                   vllm_same_as_ours=sum(a["pred"] == b["pred"] for a, b in zip(by_name["ours"], by_name["vllm"], strict=True)))
        print(f"vLLM vs ours: {out['vllm_ratio']:.2f}x episodes/s, predictions identical: {out['vllm_same_as_ours']}/{n}; "
              f"server start (not in the seconds above, paid once per model served): {out['vllm_start_s']:.0f} s")
    if "one-at-a-time" in t:
        print(f"ours vs one-at-a-time: {t['one-at-a-time'] / t['ours']:.2f}x")
    if args.vs_fewshot:
        ft = {name: (secs, recs) for name, _, _, secs, recs in results if name in ("ours", "generate", "vllm")}
        out["agents"] = agent_costs(args, task, indices, search, params, ft)
    return out


VLLM_START_S: list[float] = []  # seconds each vLLM server took to come up


def vllm_backend(mp, args):
    """The model on a vLLM server (`--skip vllm` where .venv-vllm is missing), warmed up; its
    start-up time is kept apart (`VLLM_START_S`), as it is paid once per model, not per episode."""
    from fireact_utils.llm import VLLMBackend

    t0 = time.perf_counter()
    backend = VLLMBackend(mp.model_copy(update={"vllm_args": args.vllm_args}), concurrency=args.batch_size)
    backend.generate(["Warm-up:"], [], max_new_tokens=2)
    VLLM_START_S.append(time.perf_counter() - t0)
    return backend


def agent_costs(args, task, indices, search, params, ft: dict[str, tuple[float, list[dict]]]) -> dict:
    """The fine-tuned agent's cost against few-shot ReAct of the base model on the same questions,
    per decoder the fine-tuned agent ran on above (`ft`: name -> seconds, episodes): ours, and
    `model.generate`, which prefills every turn's whole prompt again as an API call does. Per
    episode and per correct answer (FireAct's claim is that the fine-tuned agent is the cheap one)."""
    from fireact_utils.agent import run_episodes
    from fireact_utils.config import ModelParams
    from fireact_utils.llm import GenerateBackend, LocalBackend

    mp = ModelParams(name=args.model, device=args.device)
    ours = LocalBackend(mp, batch_size=args.batch_size)
    ours.generate(["Warm-up:"], [], max_new_tokens=2)
    backends = {"ours": ours, "generate": GenerateBackend(mp, args.batch_size, ours.model, ours.tok)}
    fewshot = params.model_copy(update={"mode": "fewshot"})
    out = {}
    for decoder, (ft_secs, ft_recs) in ft.items():
        backend = backends[decoder] if decoder in backends else vllm_backend(mp, args)  # vllm: last, alone
        t0 = time.perf_counter()
        fs_recs = run_episodes(task, indices, backend, search, fewshot, progress=False)
        rows = {"finetuned": _cost(ft_secs, ft_recs), "fewshot": _cost(time.perf_counter() - t0, fs_recs)}
        print(f"\nagent cost, decoder {decoder}, same {len(indices)} questions ({fewshot.n_exemplars} exemplars if few-shot)")
        print(f"{'agent':<10} {'s/episode':>9} {'EM':>3} {'s/correct':>9} {'turns':>5} {'prompt tok':>10} {'gen tok':>7}")
        for name, c in rows.items():
            print(f"{name:<10} {c['s_episode']:>9.2f} {c['correct']:>3} {c['s_correct']:>9.1f} {c['turns']:>5.2f} "
                  f"{c['prompt_tokens']:>10.0f} {c['completion_tokens']:>7.0f}")
        ratio = rows["finetuned"]["s_episode"] / rows["fewshot"]["s_episode"]
        per_correct = rows["finetuned"]["s_correct"] / rows["fewshot"]["s_correct"]  # nan when neither is correct
        shown = "none of few-shot's answers was correct" if not rows["fewshot"]["correct"] else f"{per_correct:.2f}x"
        print(f"fine-tuned / few-shot ({decoder}): {ratio:.2f}x seconds per episode; seconds per correct answer: {shown}")
        out[decoder] = {**rows, "ratio_episode": ratio, "ratio_correct": per_correct}
    return out


def _cost(secs: float, recs: list[dict]) -> dict:
    """`summarize`'s means plus seconds per episode and per correct answer (inf when none is)."""
    from fireact_utils.agent import summarize

    c = summarize(recs)
    correct = sum(r["em"] for r in recs)
    return {**c, "correct": correct, "s_episode": secs / c["n"], "s_correct": secs / correct if correct else float("inf")}


class HFContinuous:
    """transformers' continuous batching (`model.generate_batch`): all prompts of a turn in one
    call; it stops at EOS or max_new_tokens only, so stops are applied to the text afterwards."""

    chat = False

    def __init__(self, model, tok):
        self.model, self.tok, self.name = model, tok, "model.generate_batch"

    def generate(self, prompts, stop, max_new_tokens=128, temperature=0.0):
        from transformers import GenerationConfig

        from fireact_utils.llm import Generation
        from fireact_utils.stops import cut_at_stop

        inputs = [self.tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
        cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=self.tok.eos_token_id,
                               pad_token_id=self.tok.pad_token_id or self.tok.eos_token_id)
        results = self.model.generate_batch(inputs, generation_config=cfg, progress_bar=False)
        out = []
        for ids, res in zip(inputs, results.values(), strict=True):
            text = cut_at_stop(self.tok.decode(res.generated_tokens, skip_special_tokens=True), stop)
            out.append(Generation(text, len(ids), len(res.generated_tokens)))
        return out


def _threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    main()
