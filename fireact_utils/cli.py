"""Command line: the same stage functions the notebooks call.

    python -m fireact_utils run params/cpu.yaml                 # papermill chain (= make demo)
    python -m fireact_utils run params/cpu_beyond.yaml --only 05_beyond_sft   # one notebook of the chain
    python -m fireact_utils generate params/smoke.yaml
    python -m fireact_utils finetune params/cpu.yaml train.epochs=1
    python -m fireact_utils evaluate params/cpu.yaml --trained outputs/runs/cpu/finetune/final \\
        --task hotpotqa-wiki --mode finetuned              # a wiki task searches its own Wikipedia corpus
    python -m fireact_utils evaluate params/cpu.yaml --task q.jsonl --search wiki --corpus paragraphs.jsonl
    python -m fireact_utils select params/recipes.yaml          # recipes and prompts compared on validation
    python -m fireact_utils headline params/cpu_full.yaml       # baselines, seeds, self-consistency on evaluate.task
    python -m fireact_utils consistency params/cpu_full.yaml --trained outputs/runs/cpu/finetune/final
    python -m fireact_utils beyond params/cpu_full.yaml         # self-improvement rounds and GRPO (notebook 05)
    python -m fireact_utils base-models params/base_models.yaml # per model: recipe chosen on val, few-shot vs fine-tuned
    python -m fireact_utils params params/cpu.yaml              # print resolved params
    python -m fireact_utils download --dest data                # FireAct public data (online)

Overrides are `section.key=value` (YAML values), before or after the flags. Unknown keys fail
before any work starts. A user's mistake (bad params, a missing data dir, a malformed question
file) is one `error:` line and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys

from .serving import ServerError


def _parser() -> argparse.ArgumentParser:
    from .chain import NOTEBOOKS

    ap = argparse.ArgumentParser(prog="fireact", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("run", "generate", "finetune", "evaluate", "select", "headline", "consistency", "beyond", "base-models",
                 "params"):
        s = sub.add_parser(name)
        s.add_argument("params_file")
        s.add_argument("overrides", nargs="*", help="section.key=value")
        if name == "run":
            s.add_argument("--redo", action="store_true", help="re-execute notebooks already done")
            s.add_argument("--no-html", action="store_true")
            s.add_argument("--only", action="append", choices=NOTEBOOKS, metavar="NOTEBOOK",
                           help=f"execute this notebook only; repeat for more, run in chain order ({', '.join(NOTEBOOKS)})")
        if name in ("evaluate", "consistency", "beyond"):
            s.add_argument("--trained", "--adapter", dest="trained",
                           help="what fine-tuning wrote (finetune/final): a LoRA adapter or a full model"
                                + {"beyond": "; default: the run's own fine-tune",
                                   "consistency": "; needed unless study.sc_agents=[fewshot] or its samples are all saved"}.get(name, ""))
        if name == "evaluate":
            s.add_argument("--model", help="model spec (HF id, path, alias); default params model.name")
            s.add_argument("--task", help="task name or question file (.json/.jsonl)")
            s.add_argument("--method", choices=["io", "cot", "react", "reflexion"])
            s.add_argument("--mode", choices=["fewshot", "finetuned"])
            s.add_argument("--search", choices=["recorded", "serpapi", "wiki"])
            s.add_argument("--corpus", help="--search wiki: a multihop corpus name or a JSONL of {title, text}")
            s.add_argument("--name", default=None, help="condition name (output file stem)")
    d = sub.add_parser("download")
    d.add_argument("--dest", default="data")
    return ap


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if any(a.startswith("-") for a in extra) or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides += extra  # overrides after the flags
    try:
        return _run(args)
    except (ValueError, FileNotFoundError, ServerError) as e:  # ParamsError, DataFileError, ModelSpecError, bad tasks
        print(f"error: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from .config import load_params

    if args.cmd == "download":
        from .download import download_fireact

        print(download_fireact(args.dest))
        return 0
    ov = list(args.overrides)
    if args.cmd == "evaluate":
        flags = {"model.name": args.model, "evaluate.task": args.task, "agent.method": args.method,
                 "agent.mode": args.mode, "search.kind": args.search, "search.corpus": args.corpus}
        ov += [f"{k}={v}" for k, v in flags.items() if v is not None]
    p = load_params(args.params_file, ov)
    from . import pipeline

    if args.cmd == "params":
        print(json.dumps(p.dump(), indent=2))
    elif args.cmd == "run":
        from .chain import NOTEBOOKS, run_chain

        chosen = [nb for nb in NOTEBOOKS if nb in (args.only or NOTEBOOKS)]
        run_chain(args.params_file, args.overrides, chosen, html=not args.no_html, redo=args.redo)  # ends naming the results
    elif args.cmd == "generate":
        print(json.dumps(pipeline.generate(p), indent=2))
        print(f"dataset: {len(pipeline.build_dataset(p))} trajectories in {p.run_dir / 'dataset'}")
    elif args.cmd == "finetune":
        print(pipeline.finetune(p))
    elif args.cmd == "select":
        from . import recipes

        for which, search in (("fewshot_variants", recipes.fewshot_search), ("recipes", recipes.recipe_search)):
            table = recipes.report_selection(p, search(p), which)
            if len(table):
                print(f"{recipes.TITLES[which]}, chosen: {recipes.chosen_label(table)}")
                print(table[["condition", "n", "em", "em_lo", "em_hi", "settings"]].to_string(index=False))
    elif args.cmd == "headline":
        _headline(p)
    elif args.cmd == "consistency":
        _consistency(p, args.trained)
    elif args.cmd == "beyond":
        _beyond(p, args.trained or pipeline.finetune(p))
    elif args.cmd == "base-models":
        from .base_models import COLUMNS, report

        table = report(p)
        print(table[[c for c in COLUMNS if c in table]].to_string(index=False))
    elif args.cmd == "evaluate":
        from .agent import summarize
        from .llm import make_llm
        from .train import adapter_model_params

        if args.trained:
            p = p.model_copy(update={"model": adapter_model_params(p.model, args.trained)})
        pipeline.check_task(p)  # a bad question file fails here, before a model is loaded
        llm = make_llm(p.llm, p.model, p.agent.batch_size)
        name = args.name or f"{p.agent.mode}_{p.agent.method}_{p.evaluate.task}".replace("/", "_").replace(":", "_")
        recs = pipeline.run_condition(p, name, llm, p.agent)
        print(json.dumps(summarize(recs), indent=2))
        print(f"episodes: {p.run_dir / 'eval' / (name + '.jsonl')}")
    return 0


def _headline(p) -> None:
    """The main recipe on evaluate.task: few-shot baselines and the fine-tuned agent, the recipe
    over study.seeds, every seed's agent in the held-out environments of study.transfer_tasks,
    and the self-consistency curve of both agents (study.sc_ks). study.preregistered freezes it."""
    from . import pipeline, recipes
    from .evaluate import write_table
    from .tables import condition_table, paired_gain

    recipes.preregister(p)
    trained = pipeline.finetune(p)
    conds = pipeline.evaluate(p, trained)
    table = condition_table(p, conds)
    write_table(table, p.run_dir / "tables" / "main")  # as notebook 03
    print(table[["condition", "n", "em", "em_lo", "em_hi", "turns", "completion_tokens"]].to_string(index=False))
    print(json.dumps(paired_gain(p, conds)))
    if p.study.seeds:
        seeds = recipes.report_seeds(p, trained, conds.get("base_fewshot_react"))
        print(seeds[[c for c in recipes.SEED_COLUMNS if c in seeds]].to_string(index=False))
    if p.study.transfer_tasks:
        transfer = recipes.report_transfer(p, trained)
        print(transfer[["task", *[c for c in recipes.SEED_COLUMNS if c in transfer]]].to_string(index=False))
    if p.study.sc_ks:
        _consistency(p, trained)


def _consistency(p, trained) -> None:
    """The self-consistency curve of study.sc_agents (few-shot base, `trained`) over study.sc_ks, saved with its figure."""
    from .self_consistency import report

    if not p.study.sc_ks:
        raise ValueError("study.sc_ks is empty: name the k values to vote over, e.g. 'study.sc_ks=[1,3,5]'")
    print(report(p, trained).to_string(index=False))


def _beyond(p, trained) -> None:
    """Notebook 05's studies from the SFT student `trained`: self-improvement rounds, then GRPO."""
    from . import rl, self_improve

    if not (p.self_improve.rounds or p.rl.steps):
        raise ValueError("self_improve.rounds and rl.steps are both 0: nothing to run")
    if p.self_improve.rounds:
        print(self_improve.report(p, trained).to_string(index=False))
    if p.rl.steps:
        table, curve = rl.report(p, trained)
        print(table.to_string(index=False))
        print(curve.to_string(index=False))
