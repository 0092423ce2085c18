"""The kit's local decoders against each other: episodes/s and identical predictions.

The same HotpotQA dev questions (FireAct's seeded shuffle), the built-in model, ReAct (few-shot,
or the fine-tuned agent with --trained), greedy, recorded search, side by side in one run:

  vllm               the model on a vLLM server the kit starts (`llm.VLLMBackend`, .venv-vllm):
                     each turn sent as the turn before ends, continuous batching and prefix caching
                     in the engine; its start-up is timed apart (paid once per model served)
  generate           transformers' batched `model.generate` per turn (`llm.GenerateBackend`: left
                     padding, a row stops at the kit's stops, checked on its text each step): the
                     path that needs no server
  generate_batch     transformers' continuous batching (`model.generate_batch`) per turn; it
                     knows only EOS, so each turn runs to max_new_tokens and is cut after

The transformers paths run turn by turn (all unfinished episodes generate together, as the kit's
agent loop does for any non-streaming backend). Greedy decoding should give the same predictions
every way; a difference points at float noise on near-ties (padding and batch shape change the
order of float sums). The verdict line is vLLM's ratio to the best in-process path. The kit's own
decoder (continuous batching with a prefix KV store) lost to vLLM here and was deleted: its last
figures are in docs/speed.md.

    python benchmarks/rollouts.py --skip generate_batch                  # 32 questions, max_turns 8
    python benchmarks/rollouts.py --n 4 --max-turns 2                    # check that it runs
    python benchmarks/rollouts.py --trained outputs/runs/cpu/finetune/final   # the fine-tuned agent
    python benchmarks/rollouts.py --trained outputs/runs/cpu/finetune/final --vs-fewshot --n-exemplars 1 \
        --skip generate_batch       # both agents on both decoders: cost against prompting

Needs FIREACT_DATA_DIR (the FireAct data) and .venv-vllm (or `--skip vllm`); the model is
converted into $FIREACT_CACHE on first use.
"""

from __future__ import annotations

import argparse
import time

RUNS = ("generate", "generate_batch", "vllm")  # vllm last: its server stays up for --vs-fewshot, alone on the cores
VLLM_START_S: list[float] = []  # seconds each vLLM server took to come up


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=32, help="questions (first n of eval_indices(task, n))")
    ap.add_argument("--max-turns", type=int, default=8, help="Thought/Action steps per episode")
    ap.add_argument("--batch-size", type=int, default=32, help="episodes decoding together (vLLM: requests in flight)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="tokens per step (default: AgentParams')")
    ap.add_argument("--model", default="smollm2-135m", help="model spec (alias, path or HF id)")
    ap.add_argument("--trained", default=None,
                    help="what fine-tuning wrote (finetune/final): run the fine-tuned agent (short prompts, long generations)")
    ap.add_argument("--vs-fewshot", action="store_true",
                    help="with --trained: also run few-shot ReAct of the base model on the same questions, on vllm "
                         "and generate, and compare the two agents' cost per episode and per correct answer")
    ap.add_argument("--n-exemplars", type=int, default=None, help="few-shot exemplars (default: AgentParams'; the demo uses 1)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--skip", nargs="*", default=[], choices=RUNS, help="runs to leave out")
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
    from fireact_utils.llm import GenerateBackend
    from fireact_utils.serving import stop_all
    from fireact_utils.tasks import eval_indices, load_task
    from fireact_utils.tools import RecordedSearch

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    task = load_task("hotpotqa", "dev")
    indices = eval_indices(task, args.n)
    search = RecordedSearch()
    base = ModelParams(name=args.model, device=args.device, vllm_args=args.vllm_args)
    mp = base
    if args.trained:
        from fireact_utils.train import adapter_model_params

        mp = adapter_model_params(base, args.trained)
    extra = {"max_new_tokens": args.max_new_tokens} if args.max_new_tokens else {}
    if args.n_exemplars:
        extra["n_exemplars"] = args.n_exemplars
    params = AgentParams(method="react", mode="finetuned" if args.trained else "fewshot", temperature=0.0,
                         max_turns=args.max_turns, batch_size=args.batch_size, **extra)

    def timed(backend) -> tuple[float, list[dict]]:
        t0 = time.perf_counter()
        recs = run_episodes(task, indices, backend, search, params, progress=False)
        return time.perf_counter() - t0, recs

    results: dict[str, tuple[float, list[dict]]] = {}
    gen = None
    for name in RUNS:
        if name in args.skip:
            continue
        if name == "vllm":
            backend = vllm_backend(mp, args)
        else:
            gen = gen or GenerateBackend(mp, args.batch_size)
            gen.generate(["Warm-up:"], [], max_new_tokens=2)  # first-call costs (kernels, allocator) off the clock
            backend = gen if name == "generate" else HFContinuous(gen.model, gen.tok)
        results[name] = timed(backend)
        print(f"[{name}: {results[name][0]:.1f} s]", flush=True)  # progress, in case a later run is killed

    n = len(indices)
    first = next(iter(results.values()))[1]
    print(f"\nReAct {params.mode} ({params.n_exemplars} exemplars if few-shot), {mp.name}, HotpotQA dev n={n}, "
          f"max_turns={args.max_turns}, max_new_tokens={params.max_new_tokens}, threads={_threads()}")
    print(f"{'decoder':<15} {'seconds':>8} {'episodes/s':>10} {'EM':>3} {'finished':>8} {'prompt tok':>10} {'same pred':>9}")
    for name, (secs, recs) in results.items():
        em = sum(r["em"] for r in recs)
        fin = sum(r["status"] == "finished" for r in recs)
        same = sum(a["pred"] == b["pred"] for a, b in zip(first, recs, strict=True))
        print(f"{name:<15} {secs:>8.1f} {n / secs:>10.3f} {em:>3} {fin:>8} {sum(r['prompt_tokens'] for r in recs):>10} "
              f"{same:>6}/{n}")
    t = {name: secs for name, (secs, _) in results.items()}
    out: dict = {"n": n, "seconds": t}
    local = {k: v for k, v in t.items() if k != "vllm"}
    if "vllm" in t and local:
        best = min(local, key=local.get)
        same = sum(a["pred"] == b["pred"] for a, b in zip(results["vllm"][1], results[best][1], strict=True))
        out.update(ratio=local[best] / t["vllm"], best_local=best, same=same, vllm_start_s=VLLM_START_S[0])
        print(f"vLLM vs the best in-process path ({best}): {out['ratio']:.2f}x episodes/s; identical predictions: "
              f"{same}/{n}; server start (not in the seconds above, paid once per model served): {VLLM_START_S[0]:.0f} s")
    if args.vs_fewshot:
        out["agents"] = agent_costs(args, task, indices, search, params, base, results)
    stop_all()
    return out


def vllm_backend(mp, args):
    """The model on a vLLM server, warmed up; its start-up time is kept apart (`VLLM_START_S`), as
    it is paid once per model served, not per episode."""
    from fireact_utils.llm import VLLMBackend

    t0 = time.perf_counter()
    backend = VLLMBackend(mp, concurrency=args.batch_size)
    backend.generate(["Warm-up:"], [], max_new_tokens=2)
    VLLM_START_S.append(time.perf_counter() - t0)
    return backend


def agent_costs(args, task, indices, search, params, base, ft: dict[str, tuple[float, list[dict]]]) -> dict:
    """The fine-tuned agent's cost against few-shot ReAct of the base model on the same questions,
    per decoder the fine-tuned agent ran on above (`ft`: name -> seconds, episodes): per episode
    and per correct answer (FireAct's claim is that the fine-tuned agent is the cheap one)."""
    from fireact_utils.agent import run_episodes
    from fireact_utils.llm import GenerateBackend
    from fireact_utils.serving import stop_all

    fewshot = params.model_copy(update={"mode": "fewshot"})
    out = {}
    for decoder in [d for d in ("vllm", "generate") if d in ft]:  # vllm first: the same model's server is still up
        backend = vllm_backend(base, args) if decoder == "vllm" else GenerateBackend(base, args.batch_size)
        t0 = time.perf_counter()
        fs_recs = run_episodes(task, indices, backend, search, fewshot, progress=False)
        fs_secs = time.perf_counter() - t0
        stop_all()
        rows = {"finetuned": _cost(*ft[decoder]), "fewshot": _cost(fs_secs, fs_recs)}
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
