"""Command line: the same stage functions the notebooks call.

    python -m fireact_utils run params/cpu.yaml                 # papermill chain (= make demo)
    python -m fireact_utils run params/cpu_beyond.yaml --only 05_beyond_sft   # one notebook of the chain
    python -m fireact_utils generate params/smoke.yaml
    python -m fireact_utils finetune params/cpu.yaml train.epochs=1
    python -m fireact_utils evaluate params/cpu.yaml --trained outputs/runs/cpu/finetune/final \\
        --task hotpotqa-wiki --mode finetuned              # a wiki task searches its own Wikipedia corpus
    python -m fireact_utils evaluate params/cpu.yaml --task q.jsonl --search wiki --corpus paragraphs.jsonl
    python -m fireact_utils select params/recipes.yaml          # recipes and prompts compared on validation
    python -m fireact_utils sweeps params/cpu_full.yaml         # notebook 04's sweeps: transfer, noise, data size, mixtures
    python -m fireact_utils headline params/cpu_full.yaml       # baselines, seeds, self-consistency on evaluate.task
    python -m fireact_utils pieces params/headline.yaml         # a study's pieces (headline, base-models)
    python -m fireact_utils piece params/headline.yaml seed-1   # run one anywhere; writes its bundle
    python -m fireact_utils merge params/headline.yaml b1.tar.gz b2.tar.gz   # the study's tables from bundles
    python -m fireact_utils consistency params/cpu_full.yaml --trained outputs/runs/cpu/finetune/final
    python -m fireact_utils beyond params/cpu_full.yaml         # self-improvement rounds and GRPO (notebook 05)
    python -m fireact_utils base-models params/base_models.yaml # per model: recipe chosen on val, few-shot vs fine-tuned
    python -m fireact_utils report results/ --docs              # the committed study rebuilt, docs' tables from it
    python -m fireact_utils compare outputs/runs/cpu outputs/runs/cpu_lora   # paired gains, flipped questions
    python -m fireact_utils fork outputs/runs/cpu outputs/runs/ex03_200      # a new run from the demo's model and episodes
    python -m fireact_utils compare outputs/runs/cpu outputs/runs/cpu_lora --html flips.html   # and those questions' episodes
    python -m fireact_utils browse outputs/runs/cpu             # every episode in outputs/runs/cpu/browser.html
    python -m fireact_utils params params/cpu.yaml              # print resolved params
    python -m fireact_utils download --dest data                # FireAct's data + multihop, checked (online)
    python -m fireact_utils download --dest data --only fireact  # FireAct's data alone: all the demo reads
    python -m fireact_utils download --check --dest ../shared/fireact --multihop-dest ../shared/multihop

Every stage reuses only what its own settings made (`keys`); an output made under other settings
stops the command with one line naming them, and `--redo` recomputes it.

Overrides are `section.key=value` (YAML values), before or after the flags. Unknown keys fail
before any work starts. A user's mistake (bad params, a missing data dir, a malformed question
file) is one `error:` line and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from . import keys
from .download import DownloadError
from .serving import ServerError


def _parser() -> argparse.ArgumentParser:
    from .chain import NOTEBOOKS
    from .pieces import STUDIES

    ap = argparse.ArgumentParser(prog="fireact", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("run", "generate", "finetune", "evaluate", "select", "sweeps", "headline", "consistency", "beyond",
                 "base-models", "pieces", "piece", "merge", "params"):
        s = sub.add_parser(name)
        s.add_argument("params_file")
        if name == "piece":
            s.add_argument("piece", help="a piece's name (`pieces` lists them)")
            s.add_argument("--root", help="parent of the piece's output root (default <output_root>/pieces)")
            s.add_argument("--bundle-dir", help="where its bundle goes (default beside its run dir); a partial "
                           "bundle of the piece there is resumed from")
            s.add_argument("--partial", action="store_true", help="run nothing: bundle what a piece cut short saved "
                           "(<run>-<piece>.partial.tar.gz), so a run of it on any machine resumes from there")
            s.add_argument("--minutes", type=float, help="stop the piece after this many minutes and bundle what it "
                           "saved as partial (exit code 3); the same command later goes on from there")
        if name == "merge":
            s.add_argument("bundles", nargs="+", help="the pieces' bundles (.tar.gz)")
        if name in ("pieces", "piece"):
            s.add_argument("--study", choices=list(STUDIES),
                           help="which study of the params file (default: base-models where it names "
                                "study.base_models, else headline)")
        if name == "pieces":
            s.add_argument("--submit", metavar="CLUSTER", help="run every piece (or --only ones) through submitit: "
                           "'local' (processes here), 'slurm' (a job array), 'auto' (slurm where there is one)")
            s.add_argument("--only", action="append", metavar="PIECE", help="with --submit: this piece; repeat for more")
            s.add_argument("--folder", default="outputs/submitit", help="submitit's logs and job files")
        s.add_argument("overrides", nargs="*", help="section.key=value")
        if name != "params":
            s.add_argument("--redo", action="store_true", help="recompute what other settings made (each stage "
                           "reuses only what its own settings made, else stops naming them)"
                           + ("; re-execute notebooks already done" if name == "run" else ""))
        if name == "run":
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
    d = sub.add_parser("download", help="fetch FireAct's data and the multihop paragraphs, checked against "
                       "fireact_utils/data_manifest.json (resumes; skips files that match)")
    d.add_argument("--dest", default="data", help="FireAct data dir (FIREACT_DATA_DIR)")
    d.add_argument("--multihop-dest", help="multihop dir (FIREACT_MULTIHOP_DIR); default <dest>/multihop")
    d.add_argument("--base-url", help="FireAct files' base URL, laid out as its repository (default $FIREACT_DATA_URL, "
                   "else raw GitHub at the manifest's commit)")
    d.add_argument("--multihop-url", help="multihop files' base URL (default $FIREACT_MULTIHOP_URL; no public host)")
    d.add_argument("--manifest", help="another manifest (default fireact_utils/data_manifest.json)")
    mode = d.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="download nothing: print the files that are missing or differ")
    mode.add_argument("--write-manifest", action="store_true", help="regenerate the manifest from --dest/--multihop-dest, "
                      "and (with the default manifest) the wiki tasks' held-out question keys (holdout.QUESTION_KEYS)")
    d.add_argument("--only", action="append", choices=["fireact", "multihop"], metavar="SET",
                   help="fireact or multihop: this set of files only; repeat for both (default: both)")
    r = sub.add_parser("report", help="the reference study: each study's tables and figures rebuilt from its "
                       "bundles under results/, with no model (a minute)")
    r.add_argument("results", nargs="?", default="results", help="a folder of studies, each a folder of bundles")
    r.add_argument("--out", default="outputs/results", help="where the rebuilt runs go (<out>/<study>/)")
    r.add_argument("--docs", action="store_true", help="rewrite the result tables marked in README.md and docs/")
    r.add_argument("--check", action="store_true", help="with --docs: write nothing; exit 1 where a page differs")
    c = sub.add_parser("compare", help="two runs' shared conditions: EM of each, paired gain with CI, flipped ids")
    c.add_argument("run_a", help="a run directory (with eval/), e.g. outputs/runs/cpu")
    c.add_argument("run_b", help="the other run; the gain is run_b minus run_a")
    f = sub.add_parser("fork", help="begin a new run from another's outputs (model, episodes; no checkpoints, "
                       "tables or figures), so an exercise extends a run under its own name")
    f.add_argument("src", help="a run directory, e.g. outputs/runs/cpu")
    f.add_argument("dest", help="the new run's directory, e.g. outputs/runs/ex03_200 (run it with name=ex03_200)")
    c.add_argument("--html", metavar="FILE", help="also write the flipped questions' episodes, both runs side by "
                   "side, as an episode browser page (docs/browser.md)")
    b = sub.add_parser("browse", help="every episode of a run in one static HTML page: a filterable table, each "
                       "episode's steps, each question across conditions, the training data (docs/browser.md)")
    b.add_argument("run_dir", help="a run directory (with eval/), e.g. outputs/runs/cpu")
    b.add_argument("--out", help="the page (default RUN_DIR/browser.html)")
    b.add_argument("--ids", nargs="+", metavar="ID", help="only these episode ids, e.g. hotpotqa/dev/12")
    b.add_argument("--conditions", nargs="+", metavar="NAME", help="only these conditions (eval/NAME.jsonl)")
    return ap


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if any(a.startswith("-") for a in extra) or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides += extra  # overrides after the flags
    if args.cmd == "merge":  # bundles and overrides share the positionals: an override has a '='
        args.overrides += [b for b in args.bundles if "=" in Path(b).name]
        args.bundles = [b for b in args.bundles if "=" not in Path(b).name]
    try:
        return _run(args)
    except (ValueError, FileNotFoundError, ServerError, DownloadError) as e:  # ParamsError, DataFileError, ModelSpecError, bad tasks
        print(f"error: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from .config import load_params

    if args.cmd == "report":
        return _report(args)
    if args.cmd == "compare":
        from .failures import compare_main

        return compare_main(args.run_a, args.run_b, args.html)
    if args.cmd == "browse":
        from .browser import write

        print(f"episode browser: {write(args.run_dir, args.out, args.ids, args.conditions)}")
        return 0
    if args.cmd == "fork":
        from .fork import fork_main

        return fork_main(args.src, args.dest)
    if args.cmd == "download":
        from . import download as dl

        dirs = {"fireact": Path(args.dest), "multihop": Path(args.multihop_dest or Path(args.dest) / "multihop")}
        dirs = {name: d for name, d in dirs.items() if name in (args.only or dirs)}
        manifest = Path(args.manifest) if args.manifest else dl.MANIFEST
        if args.write_manifest:
            if args.only:
                raise ValueError("--write-manifest lists every set of files: drop --only")
            print(dl.write_manifest(dirs, manifest))
            if not args.manifest:  # facts about the same files: regenerated with them
                from .holdout import write_question_keys

                print(write_question_keys(dirs["multihop"]))
        elif args.check:
            bad = dl.check(dirs, dl.load_manifest(manifest))
            print("\n".join(bad) or f"every file in the manifest matches under {' and '.join(map(str, dirs.values()))}")
            return 1 if bad else 0
        else:
            dl.download(dirs, {"fireact": args.base_url, "multihop": args.multihop_url}, dl.load_manifest(manifest))
        return 0
    if getattr(args, "redo", False):  # read by every stage (`keys.reuse`) and inherited by the chain's kernels
        os.environ[keys.REDO_ENV] = "1"
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
        final = pipeline.finetune(p)
        if int(os.environ.get("RANK", "0")) == 0:  # under `accelerate launch`, the process that wrote the log
            from .plots import plot_run_loss_curve

            if plot_run_loss_curve(p.run_dir):  # as notebook 02
                print(f"loss curve: {p.run_dir / 'figures' / 'loss_curve.png'}")
        print(final)
    elif args.cmd == "select":
        from . import recipes

        if not (p.study.fewshot_variants or p.study.recipes):
            raise ValueError("study.fewshot_variants and study.recipes are both empty: nothing to choose")
        for which, table in recipes.selections(p).items():  # as notebook 02
            print(f"{recipes.TITLES[which]}, chosen: {recipes.chosen_label(table)}")
            print(table[["condition", "n", "em", "em_lo", "em_hi", "settings"]].to_string(index=False))
    elif args.cmd == "sweeps":
        _sweeps(p)
    elif args.cmd == "headline":
        from .headline import report

        report(p)
    elif args.cmd in ("pieces", "piece", "merge"):
        return _pieces(args, p)
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


def _report(args: argparse.Namespace) -> int:
    """Rebuild every study under results/; with --docs, write (or --check) the pages' marked tables."""
    from . import results

    studies = results.rebuild(args.results, args.out)
    for s in studies:
        print(f"{s.name}: {len(s.records)} pieces" + (f" (missing: {', '.join(s.missing)})" if s.missing else "")
              + f"; tables {s.run_dir / 'tables'}, figures {s.run_dir / 'figures'}")
    if args.docs:
        changed = results.write_docs(results.blocks(studies), results.pages(), check=args.check)
        if args.check and changed:
            print(f"differ from {args.results}: {', '.join(map(str, changed))} "
                  "(python -m fireact_utils report --docs rewrites them)", file=sys.stderr)
            return 1
        print(f"{'checked' if args.check else 'rewrote'} {len(results.pages())} pages; "
              f"{'none differ' if not changed else 'changed: ' + ', '.join(map(str, changed))}")
    return 0


def _pieces(args: argparse.Namespace, p) -> int:
    """List a study's pieces, run one (writing its bundle), submit them, or merge bundles."""
    from . import pieces

    if args.cmd == "piece" and args.minutes and not args.partial:
        out, finished = pieces.run_piece_within(args.params_file, args.overrides, args.piece, args.minutes, args.root,
                                                args.bundle_dir, args.study)
        if not finished:
            print(f"piece {args.piece} stopped at {args.minutes:g} min: partial bundle {out} "
                  f"({pieces.bundle_summary(out)}); the same command goes on from it")
            return pieces.CUT
    elif args.cmd == "piece":
        out = pieces.run_piece(p, args.piece, args.root, args.bundle_dir, args.study, partial=args.partial)
        print(f"bundle: {out} ({pieces.bundle_summary(out)})")
    elif args.cmd == "merge":
        out = pieces.merge(p, args.bundles)
        print(f"merged {len(args.bundles)} bundles into {out}: tables {out / 'tables'}, figures {out / 'figures'}")
    elif args.submit:
        names = args.only or [x.name for x in pieces.pieces(p, args.study)]
        jobs = pieces.submit(args.params_file, args.overrides, names, args.folder,
                             None if args.submit == "auto" else args.submit, study=args.study)
        for name, job in zip(names, jobs, strict=True):
            print(f"{name}: job {job.job_id}")
        for name, job in zip(names, jobs, strict=True):
            print(f"{name}: bundle {job.result()}")
    else:
        print(f"{pieces.study_of(p, args.study)} of {p.name}, study key {pieces.study_key(p)['key']}:")
        for x in pieces.pieces(p, args.study):
            print(f"  {x.name}: {x.what}")
    return 0


def _sweeps(p) -> None:
    """Notebook 04's sweeps from the run's fine-tune, written as the notebook writes them, then its summary."""
    from . import pipeline, studies
    from .summaries import scaling_and_robustness

    if not studies.any_sweep(p):
        raise ValueError("study.generalization_tasks, noise_rates (with noise_kinds), data_sizes and mixtures are "
                         "all empty: nothing to run")
    studies.report(p, pipeline.finetune(p))
    print(scaling_and_robustness(p.run_dir, p.evaluate.task))


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
