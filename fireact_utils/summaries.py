"""Closing summaries of each notebook, read from a run's saved files."""

from __future__ import annotations

from pathlib import Path

from .io import read_json, read_jsonl


def _q(text: str | None) -> str:
    """An answer or question as inline Markdown code (None: the agent gave none)."""
    return "*none* (never finished)" if text is None else f"`{text.replace('`', chr(39))}`"


# ---------------------------------------------------------------- 00: one episode

def walkthrough(record: dict, n_exemplars: int) -> str:
    """Notebook 00: the numbers of the one few-shot episode it ran (a `run_episodes` record)."""
    searches = sum(s["action"] == "search" for s in record["steps"])
    tokens = record["prompt_tokens"] + record["completion_tokens"]
    share = record["prompt_tokens"] / tokens if tokens else 0.0
    return "\n".join([
        f"**This run's episode** (few-shot {record['method']}, {n_exemplars} exemplar(s), `{record['model']}`):",
        "",
        f"- question: {_q(record['question'])}",
        f"- exit status **{record['status']}** after {record['turns']} turn(s): {searches} search(es), "
        f"{record['llm_calls']} model call(s)",
        f"- answer {_q(record['answer'])} against gold {_q(record['gold'])}: EM {int(record['em'])}, "
        f"F1 {record['f1']:.2f}",
        f"- tokens: {record['prompt_tokens']:,} prompt + {record['completion_tokens']:,} completion; the prompt, "
        f"exemplars re-read at every call, is {share:.0%} of them",
    ])


# ---------------------------------------------------------------- 01: the teacher and the dataset

def generation(run_dir: str | Path) -> str:
    """Notebook 01: what the teacher ran and the reward filter kept (generate/), and the dataset
    built (dataset/card.json), with how many of its trajectories came from this run's teacher."""
    from collections import Counter

    from .data import filter_outcome, generated_episodes

    run_dir = Path(run_dir)
    episodes = generated_episodes(run_dir / "generate")
    summary_file = run_dir / "generate" / "summary.json"
    lines = []
    if episodes and summary_file.is_file():
        models = sorted({str(r.get("model")) for r in episodes})
        outcomes = Counter(filter_outcome(r)[0] for r in episodes)
        dropped = ", ".join(f"{n} {o}" for o, n in outcomes.most_common() if o != "kept") or "none"
        lines += [f"**Teacher** ({', '.join(f'`{m}`' for m in models)}): {len(episodes)} episodes; the reward filter "
                  f"kept **{outcomes['kept']}** and dropped {len(episodes) - outcomes['kept']} ({dropped}).", "",
                  "| task:method | questions | kept | yield | mean turns | tokens / episode |", "|---|---|---|---|---|---|"]
        for key, s in read_json(summary_file).items():
            lines.append(f"| {key} | {s['n']} | {s['successes']} | {s['yield']:.0%} | {s['turns']:.1f} | "
                         f"{s['prompt_tokens'] + s['completion_tokens']:,.0f} |")
    else:
        lines.append("**Teacher**: not run (`generate.n_questions` is 0); the data is the released source alone.")
    card_file = run_dir / "dataset" / "card.json"
    if card_file.is_file():
        card = read_json(card_file)
        ids = {r["id"] for r in episodes if "id" in r}
        ours = sum(r.get("id") in ids for r in read_jsonl(run_dir / "dataset" / "trajectories.jsonl"))
        prov = run_dir / "provenance" / "dataset.json"
        joined = read_json(prov)["params"]["dataset"].get("teacher_episodes", True) if prov.is_file() else None
        why = " (`dataset.teacher_episodes` is false: the teacher's successes stay out)" if joined is False else ""
        per = ", ".join(f"{k}: {n}" for k, n in card["by_task_method"].items())
        lines += ["", f"**Dataset**: {card['n']} trajectories ({per}), {card['turns_mean']:.1f} turns on average; "
                  f"{ours} of them from this run's teacher{why}."]
    return "\n".join(lines)


# ---------------------------------------------------------------- any notebook: a section this run skips

def skipped(section: str, params_file: str, cost: str, command: str = "run") -> str:
    """The one line a notebook prints for a section its params leave out: what, the command that
    runs it (`python -m fireact_utils COMMAND PARAMS_FILE`) and its measured cost."""
    return f"{section}: not in this run; `python -m fireact_utils {command} {params_file}` runs this section ({cost})."


# What each skippable section of a notebook needs: the key that turns it on -> (section, params file
# that sets it, its cost as measured, with machine and date, or as estimated, CLI command).
# `test_summaries` checks each file sets its key.
SKIPPED = {
    "study.seeds": ("Training seeds", "params/headline.yaml",
                    "an estimated 5-10 h on 2 CPU cores; ~25 min on one H200 with params/headline_gpu.yaml, "
                    "summed from earlier runs' parts", "headline"),
    "study.sc_ks": ("Self-consistency", "params/headline.yaml",
                    "hours on 2 CPU cores: params/cpu_vote.yaml's vote to k = 9 took 3.1 h of sampling on the "
                    "2-core Intel VM, 2026-11-28; ~25 min on one H200 with params/headline_gpu.yaml, estimated", "headline"),
    "evaluate.searching_baseline": ("The few-shot ReAct baseline that must search", "params/cpu.yaml",
                                    "one more few-shot condition in `make demo`'s notebook 03, an estimated 10 min in "
                                    "all on 2 CPU cores", "run"),
    # notebook 02
    "study.recipes": ("Recipe selection on validation", "params/recipes.yaml",
                      "a fine-tune and 200 validation episodes per recipe: hours on 2 CPU cores", "select"),
    "study.fewshot_variants": ("Few-shot prompt selection on validation", "params/baselines.yaml",
                               "about 70 min on the 2-core AMD VM, 2026-12-03", "select"),
    # notebook 04: cpu_full.yaml runs every sweep of it at once
    "study.generalization_tasks": ("Generalization", "params/cpu_full.yaml", "many hours on 2 CPU cores", "run"),
    "study.noise_rates": ("Robustness to a noisy tool", "params/cpu_full.yaml", "many hours on 2 CPU cores", "run"),
    "study.noise_tasks": ("Fidelity and failures in the Wikipedia environment", "params/cpu_full.yaml",
                          "many hours on 2 CPU cores", "run"),
    "study.data_sizes": ("Data scaling", "params/cpu_full.yaml", "many hours on 2 CPU cores", "run"),
    "study.mixtures": ("Data mixtures", "params/cpu_full.yaml", "many hours on 2 CPU cores", "run"),
    # notebook 05: cpu_beyond.yaml also trains its own SFT student first (`full_all`: 1,893 s, 2026-11-26)
    "self_improve.rounds": ("Self-improvement", "params/cpu_beyond.yaml",
                            "two rounds; round 1 took 98 min with its evaluations on a 2-core VM, 2026-11-26, "
                            "machine not recorded; params/gpu_rl.yaml on one GPU", "beyond"),
    "rl.steps": ("GRPO", "params/cpu_beyond.yaml",
                 "20 steps took 49 min with their evaluations on a 2-core VM, 2026-11-26, machine not recorded; "
                 "params/gpu_rl.yaml runs 300 steps on one GPU", "beyond"),
}


def skipped_line(key: str) -> str:
    """`skipped` for the section that params key `key` turns on (a key of `SKIPPED`)."""
    section, params_file, cost, command = SKIPPED[key]
    return skipped(section, params_file, cost, command)


# ---------------------------------------------------------------- 03: few-shot vs fine-tuned

def evaluation(run_dir: str | Path) -> str:
    """Notebook 03: each condition's EM with its CI, turns and what the EM is made of (tables/main.csv),
    each one's most frequent failure class (tables/failures.csv), and the paired fine-tuning gain
    (tables/paired_gain.json), with whether its CI excludes 0."""
    import pandas as pd

    from .evaluate import fmt_gain, shorten

    tables = Path(run_dir) / "tables"
    df = pd.read_csv(tables / "main.csv", dtype={"condition": str, "top_answer": str})
    lines = [f"**This run's evaluation** (`tables/main.csv`, {df['n'].max()} questions per condition):", ""]
    for _, r in df.iterrows():
        parts = [_em(r), f"{r['turns']:.2f} turns, {r['finish']:.0%} finished"]
        if not pd.isna(r.get("searched")):
            parts.append(f"searched in {r['searched']:.0%} of episodes")
        if isinstance(r.get("top_answer"), str):
            parts.append(f"most frequent answer {_q(shorten(r['top_answer']))} ({r['top_answer_count']:.0f} of {r['n']})")
        if not pd.isna(r.get("em_two_option")):
            parts.append(f"EM {r['em_two_option']:.0%} on two-option questions ({r['n_two_option']:.0f}; a coin scores 50%)")
        if isinstance(r.get("not_final"), str):  # `evaluate.not_final`: the EM above may still change
            parts.append(f"**not final**: {r['not_final']}")
        lines.append(f"- **{r['condition']}**: " + "; ".join(parts) + ".")
    if (fail_file := tables / "failures.csv").is_file():
        lines += ["", "**Why episodes failed** (`tables/failures.csv`; the most frequent class other than right):", ""]
        lines += [f"- {r['condition']}: {_top_failure(r)}" for _, r in pd.read_csv(fail_file).iterrows()]
    gain_file = tables / "paired_gain.json"
    if gain_file.is_file():
        g = read_json(gain_file)
        verdict = ("its CI excludes 0" if g["lo"] > 0 or g["hi"] < 0
                   else "its CI includes 0: this run cannot tell the two agents apart")
        lines += ["", f"**Paired gain** (`{g['treatment']}` minus `{g['baseline']}`, the same {g['n']} questions): "
                  f"{fmt_gain(g['gain'], g['lo'], g['hi'])} EM points; {verdict}."]
    return "\n".join(lines)


def _top_failure(row) -> str:
    """A `failures.failure_table` row's most frequent class other than right (ties: the first in
    `failures.CLASSES`), with its count; or that none failed."""
    from .failures import CLASSES

    wrong = [c for c in CLASSES if c != "right"]
    top = max(wrong, key=lambda c: (row[c], -wrong.index(c)))
    if not row[top]:
        return f"no failure in {row['n']} episodes"
    return f"{top}, {row[top]} of {row['n']} episodes ({row[f'{top} (share)']:.0%})"


# ---------------------------------------------------------------- 02: the fine-tune

def fine_tune(run_dir: str | Path) -> str:
    """Notebook 02: what the fine-tune did and cost, from finetune/final/train_done.json and the loss
    log beside it (finetune/train_log.csv, a row every `train.logging_steps` steps)."""
    import pandas as pd

    from .config import TrainParams
    from .train import optimizer_steps

    out = Path(run_dir) / "finetune"
    meta = read_json(out / "final" / "train_done.json")
    log = pd.read_csv(out / "train_log.csv")
    tp, last = meta["params"], log.iloc[-1]
    # The log stops at the last multiple of logging_steps; the run's length comes from its params.
    steps = optimizer_steps(TrainParams(**{k: v for k, v in tp.items() if k in TrainParams.model_fields}),
                            meta["n_examples"])
    epochs = last["epoch"] * steps / last["step"]
    recipe = f"LoRA r={tp['lora_r']}" if tp["method"] == "lora" else "full fine-tune"
    secs, ckpt = meta["train_runtime_s"], meta.get("resumed_from")
    took = ("training time unknown (resumed from a checkpoint saved without its clock)" if secs is None else
            f"{secs / 60:.1f} min of training" + (f" (summed over resumes, the last from `{Path(ckpt).name}`)" if ckpt else ""))
    return "\n".join([
        f"**This run's fine-tune** (`{meta['model']['name']}`, {recipe}, loss on {tp['loss_on']} tokens, "
        f"lr {tp['learning_rate']:g}):",
        "",
        f"- {steps} optimizer steps, {epochs:.2f} epochs over {meta['n_examples']} examples "
        f"({meta['n_tokens']:,} tokens, {meta['n_loss_tokens']:,} of them with loss)",
        f"- loss {log['loss'].iloc[0]:.3f} at step {log['step'].iloc[0]:.0f} -> {last['loss']:.3f} at step {last['step']:.0f}",
        f"- {took}" + (f", {tps:,.0f} tokens/s" if (tps := meta.get("tokens_per_s")) else ""),
        f"- peak memory {meta['peak_memory_gb']:.1f} GB ({meta['peak_memory_of']})",
    ])


# ---------------------------------------------------------------- 04: the sweeps

def _em(r) -> str:
    from .evaluate import fmt_pct_ci

    return f"EM {fmt_pct_ci(r['em'], r['em_lo'], r['em_hi'])}"


def scaling_and_robustness(run_dir: str | Path, task: str) -> str:
    """Notebook 04: each noisy condition's EM and its paired difference from the same agent with a
    clean tool (tables/robustness*.csv; `task`, evaluate.task, is the one in robustness.csv), then a
    line per other sweep whose table the run wrote (generalization, data_scaling, mixtures)."""
    import pandas as pd

    tables = Path(run_dir) / "tables"
    lines = []
    for f in sorted(tables.glob("robustness*.csv")):
        df = pd.read_csv(f)
        where = task if f.stem == "robustness" else f.stem.removeprefix("robustness_")
        lines += [f"**Noisy tool on {where}** (`tables/{f.name}`; EM minus the same agent's with a clean tool, "
                  "points, paired 95% CI):", ""]
        for _, r in df[df["noise_rate"].notna()].iterrows():
            caveat = " (too few to measure robustness)" if r["too_few_corrupted"] else ""
            k = r["noise_corrupted"]
            lines.append(f"- {r['condition']}: {_em(r)}, vs clean {_gain(r, 'vs_clean')}; "
                         f"{k:.0f} corrupted observation{'' if k == 1 else 's'}{caveat}")
        lines.append("")
    studies = []
    if (f := tables / "generalization.csv").is_file():
        df = pd.read_csv(f)
        studies.append("**Generalization**: " + "; ".join(
            f"{t} ({g['n'].max()} questions): " + ", ".join(f"{r['condition']} {_em(r)}" for _, r in g.iterrows())
            for t, g in df.groupby("task", sort=False)) + ".")
    if (f := tables / "data_scaling.csv").is_file():
        df = pd.read_csv(f)
        studies.append("**Data scaling** (fine-tuned on the first N trajectories): " + "; ".join(
            f"N = {r['n_trajectories']}: {_em(r)}" for _, r in df.iterrows()) + ".")
    if (f := tables / "mixtures.csv").is_file():
        df = pd.read_csv(f)
        studies.append("**Mixtures** (fine-tuned on each dataset): " + "; ".join(
            f"{r['condition']}: {_em(r)}" for _, r in df.iterrows()) + ".")
    if not lines and not studies:
        return "**This run** wrote no table of notebook 04's sweeps: every one of them is off in its params."
    return "\n".join(lines + [f"- {s}" for s in studies]).strip()


# ---------------------------------------------------------------- 05: beyond SFT

def _gain(r, col: str) -> str:
    """Column `col` of a row, a paired difference, as signed EM points with its CI."""
    from .evaluate import fmt_gain

    return fmt_gain(r[col], r[col + "_lo"], r[col + "_hi"])


def _splits(r, gain: str | None) -> str:
    """Validation and test EM of a `self_improve.round_table` row, each with its paired `gain` column."""
    from .evaluate import fmt_pct_ci

    return "; ".join(f"{split} EM {fmt_pct_ci(r[f'{split}_em'], r[f'{split}_lo'], r[f'{split}_hi'])} ({r[f'{split}_n']:.0f} q)"
                     + (f", {_gain(r, f'{split}_{gain}')}" if gain else "") for split in ("val", "test"))


def beyond_sft(run_dir: str | Path) -> str:
    """Notebook 05: each student's validation and test EM, with its paired gain over the SFT student
    (tables/self_improve.csv, tables/rl.csv; a study whose table is missing did not run)."""
    import pandas as pd

    tables = Path(run_dir) / "tables"
    lines = []
    if (f := tables / "self_improve.csv").is_file():
        lines += ["**Self-improvement** (`tables/self_improve.csv`; EM with 95% CI, then the paired gain over the "
                  "SFT student in points):", ""]
        for _, r in pd.read_csv(f).iterrows():
            k = int(r["round"])
            if not k:
                lines.append(f"- SFT student: {_splits(r, None)}")
            elif r["control"]:
                lines.append(f"- control of round {k} (GPT-4 data alone, {r['steps']:.0f} steps): {_splits(r, 'gain')}; "
                             f"round {k} minus this control: val {_gain(r, 'val_own')}, test {_gain(r, 'test_own')}")
            else:
                lines.append(f"- round {k} (+{r['added']:.0f} of its own episodes, yield {r['yield']:.0%}, "
                             f"{r['steps']:.0f} steps): {_splits(r, 'gain')}")
        lines.append("")
    if (f := tables / "rl.csv").is_file():
        lines += ["**GRPO** (`tables/rl.csv`; EM with 95% CI, then the paired gain over the SFT student in points):", ""]
        lines += [f"- {r['model']}: {_splits(r, 'gain' if r['round'] else None)}" for _, r in pd.read_csv(f).iterrows()]
    if not lines:
        return ("**This run** ran neither study (`self_improve.rounds` and `rl.steps` are 0): its only student is "
                "notebook 02's SFT student.")
    return "\n".join(lines).strip()
