"""Test-time compute: k sampled episodes per question, majority vote over their answers.

Samples are conditions `sc_<agent>_s<j>` (j = 0..max(study.sc_ks)-1) at study.sc_temperature,
each seeded with j, so a k-vote uses samples 0..k-1 and every point of the curve shares its
samples with the next. Answers are compared normalized as the task scores them (`pred`: SQuAD
normalization, the leading yes/no, the option letter); an episode that never answered does not
vote; a tie goes to the answer given first (lowest j). pass@k, the share of questions some one
of the k samples gets right, is the vote's ceiling. Cost per question is what the k samples
spent: tokens, and seconds (each sample condition's wall time over its episodes), with the
machine(s) that spent them (a sample resumed on another machine names both). With study.sc_seeds
the fine-tuned agent of every training seed is sampled (`sc_finetuned_seed<s>_s<j>`; the main
fine-tune keeps `sc_finetuned_s<j>`) and a mean-over-seeds row per k gives the vote's seed spread.

    df = self_consistency.report(p, "outputs/runs/cpu/finetune/final")  # a row per agent and k, saved
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .evaluate import bootstrap_ci
from .pipeline import agent_model, fewshot_react, finetuned_agent, local_llm, run_condition, saved_condition
from .provenance import condition_meta, hand_edit
from .recipes import seed_model, seed_table

if TYPE_CHECKING:
    import pandas as pd

    from .config import AgentParams, ModelParams, Params


def majority_vote(records: list[dict]) -> dict:
    """The record carrying the most common normalized answer among those that answered (ties:
    the earliest); the first record if none answered."""
    answered = [r for r in records if r["answer"] is not None]
    if not answered:
        return records[0]
    counts = Counter(r["pred"] for r in answered)
    top = max(counts.values())
    return next(r for r in answered if counts[r["pred"]] == top)


def sample_agent(p: Params, finetuned: bool) -> AgentParams:
    """The agent settings of every sample: the fine-tuned agent's or the few-shot base's, at study.sc_temperature."""
    return (finetuned_agent(p) if finetuned else fewshot_react(p)).model_copy(
        update={"temperature": p.study.sc_temperature})


def samples(p: Params, who: str, trained: str | Path | None, progress: bool = True) -> list[list[dict]]:
    """max(study.sc_ks) sampled runs of one agent (few-shot base if `trained` is None), aligned by question."""
    import torch

    llm = local_llm(p, trained)
    agent = sample_agent(p, finetuned=trained is not None)
    out = []
    for j in range(max(p.study.sc_ks)):
        torch.manual_seed(j)  # sample j draws the same tokens when re-run from scratch (a resumed one continues)
        out.append(run_condition(p, f"sc_{who}_s{j}", llm, agent, n=p.study.sc_n or None, progress=progress))
    return out


def run_votes(p: Params, who: str, seed: int | None, progress: bool = True) -> None:
    """A piece (`pieces`, study consistency): the fine-tuned agent `who` of training `seed` (None or
    train.seed: the main fine-tune) trained here, then its max(study.sc_ks) sampled runs."""
    from .holdout import preregister
    from .pipeline import finetune
    from .recipes import seed_model

    preregister(p)
    samples(p, who, finetune(p) if seed in (None, p.train.seed) else seed_model(p, seed, None), progress)


def saved_samples(p: Params, who: str, model: ModelParams | None = None) -> list[list[dict]] | None:
    """Every sample of `who` as saved, if all are complete; else None. A sample saved under other
    agent settings (a temperature) or by another model than `model` (where known) is an error: its
    curve would carry this run's labels."""
    agent = sample_agent(p, who != "fewshot")
    runs = [saved_condition(p, f"sc_{who}_s{j}", n=p.study.sc_n or None, model=model, agent=agent)
            for j in range(max(p.study.sc_ks))]
    return None if any(r is None for r in runs) else runs


def sampler_model(p: Params, who: str, seed: int | None, trained: str | Path | None) -> ModelParams | None:
    """The model of `who`'s samples where it is known without training one: the base for the
    few-shot agent, `trained` for the main fine-tune; None for another training seed's (its samples
    are checked when resumed, by `run_condition`) or without `trained`."""
    if who == "fewshot":
        return p.model
    return agent_model(p, trained) if trained and seed in (None, p.train.seed) else None


def votes(runs: list[list[dict]], k: int) -> list[dict]:
    """The k-vote's record for each question (runs aligned by question)."""
    ids = [r["id"] for r in runs[0]]
    if any([r["id"] for r in run] != ids for run in runs):
        raise ValueError("self-consistency samples must cover the same questions in the same order")
    return [majority_vote([run[q] for run in runs[:k]]) for q in range(len(ids))]


def vote_curve(runs: list[list[dict]], ks: list[int], seconds_per_episode: list[float],
               n_boot: int) -> pd.DataFrame:
    """EM of the k-vote for each k (CI over questions), its ceiling `pass_at_k` (some one of the k
    samples is right), and tokens and seconds per question."""
    import pandas as pd

    rows = []
    for k in sorted(ks):
        em, lo, hi = bootstrap_ci([float(v["em"]) for v in votes(runs, k)], n_boot)
        tokens = np.sum([[r["prompt_tokens"] + r["completion_tokens"] for r in run] for run in runs[:k]], axis=0)
        rows.append({"k": k, "n": len(runs[0]), "em": em, "em_lo": lo, "em_hi": hi,
                     "pass_at_k": float(np.mean([any(r["em"] for r in q) for q in zip(*runs[:k], strict=True)])),
                     "tokens_per_question": float(tokens.mean()),
                     "seconds_per_question": float(sum(seconds_per_episode[:k]))})
    return pd.DataFrame(rows)


def seed_mean_curve(p: Params, by_seed: dict[int, list[list[dict]]], curves: list[pd.DataFrame],
                    baseline: list[list[dict]] | None = None) -> pd.DataFrame:
    """Per k, the mean row of `recipes.seed_table` over the seeds' k-votes (mean EM, CI over
    questions, the seeds' spread, and with `baseline`, another agent's samples, the paired `gain`
    over its k-vote); pass@k, tokens and seconds per question are the seeds' means (`curves`:
    each seed's `vote_curve`)."""
    import pandas as pd

    rows = []
    for k in sorted(p.study.sc_ks):
        table = seed_table(p, {s: votes(runs, k) for s, runs in by_seed.items()},
                           votes(baseline, k) if baseline else None)
        at_k = [c[c["k"] == k].iloc[0] for c in curves]
        rows.append({"k": k, **table.iloc[-1].drop("condition").dropna().to_dict(),
                     "pass_at_k": float(np.mean([r["pass_at_k"] for r in at_k])),
                     "tokens_per_question": float(np.mean([r["tokens_per_question"] for r in at_k])),
                     "seconds_per_question": float(np.mean([r["seconds_per_question"] for r in at_k])),
                     "machine": " + ".join(dict.fromkeys(m for r in at_k for m in r["machine"].split(" + ")))})
    return pd.DataFrame(rows)


def finetuned_samplers(p: Params) -> dict[str, int | None]:
    """Sample-name stem -> training seed of the fine-tuned agents voted: `finetuned` (the main
    fine-tune, seed None unless study.sc_seeds), `finetuned_seed<s>` for the other study.seeds."""
    if not p.study.sc_seeds:
        return {"finetuned": None}
    return {("finetuned" if s == p.train.seed else f"finetuned_seed{s}"): s for s in p.study.seeds}


def curve(p: Params, trained: str | Path | None, progress: bool = True) -> pd.DataFrame:
    """The self-consistency curve of study.sc_agents, the few-shot base and/or the fine-tuned agent
    `trained` (`agent` column); with study.sc_seeds a curve per training seed and their mean."""
    import pandas as pd

    whos = {"fewshot": None} if "fewshot" in p.study.sc_agents else {}
    if "finetuned" in p.study.sc_agents:
        whos |= finetuned_samplers(p)
    saved = {who: saved_samples(p, who, sampler_model(p, who, seed, trained))  # a finished curve needs no model
             for who, seed in whos.items()}
    unsaved = [who for who, runs in saved.items() if who != "fewshot" and runs is None]
    if unsaved and not trained:  # else `samples` would run the few-shot agent, or a seed would train from nothing
        raise ValueError(f"study.sc_agents samples the fine-tuned agent ({', '.join(unsaved)} not all saved): name it "
                         "with --trained (or sample the few-shot base alone: 'study.sc_agents=[fewshot]')")
    parts, by_seed, fewshot = [], {}, None
    for who, seed in whos.items():
        runs = saved[who]
        if runs is None:
            model = None if who == "fewshot" else trained if seed is None else seed_model(p, seed, trained)
            runs = samples(p, who, model, progress)
        if who == "fewshot":
            fewshot = runs
        metas = [condition_meta(p, f"sc_{who}_s{j}") for j in range(len(runs))]
        df = vote_curve(runs, p.study.sc_ks, [_seconds_per_episode(m) for m in metas], p.evaluate.bootstrap)
        df["machine"] = [" + ".join(dict.fromkeys(name for m in metas[:k] for name in m.get("machines", {})))
                         for k in df["k"]]
        df["edited_by_hand"] = ["; ".join(f"sample {j}: {note}" for j, m in enumerate(metas[:k]) if (note := hand_edit(m)))
                                or None for k in df["k"]]
        label = "fewshot ReAct" if who == "fewshot" else "finetuned ReAct" + ("" if seed is None else f", seed {seed}")
        parts.append(df.assign(agent=label))
        if seed is not None:
            by_seed[seed] = runs
    if len(by_seed) > 1:
        mean = seed_mean_curve(p, by_seed, parts[-len(by_seed):], fewshot)
        parts.append(mean.assign(agent=f"finetuned ReAct, mean over {len(by_seed)} seeds"))
    return pd.concat(parts, ignore_index=True).assign(temperature=p.study.sc_temperature)


def report(p: Params, trained: str | Path | None, progress: bool = True) -> pd.DataFrame:
    """`curve`, written to tables/self_consistency.csv (and .md, `markdown`) with its figure
    (figures/self_consistency)."""
    from .io import atomic_write_text
    from .plots import plot_self_consistency

    df = curve(p, trained, progress)
    atomic_write_text(p.run_dir / "tables" / "self_consistency.csv", df.to_csv(index=False))
    atomic_write_text(p.run_dir / "tables" / "self_consistency.md", markdown(df))
    plot_self_consistency(df, p.run_dir / "figures" / "self_consistency")
    return df


def markdown(df: pd.DataFrame) -> str:
    """The curve as a page shows it: EM of the k-vote with its CI, its ceiling pass@k, and the cost
    per question (tokens compare across machines; seconds only on the machine named)."""
    from .evaluate import fmt_ci

    lines = ["| agent | k | n | EM % [95% CI] | pass@k % | tokens/question | s/question | machine |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r.agent} | {r.k} | {r.n} | {fmt_ci(r.em, r.em_lo, r.em_hi)} | {r.pass_at_k * 100:.1f} | "
              f"{r.tokens_per_question:,.0f} | {r.seconds_per_question:.1f} | {r.machine} |" for r in df.itertuples()]
    return "\n".join(lines) + f"\n\nT = {df['temperature'].iloc[0]:g}; a tie goes to the earliest sample's answer.\n"


def _seconds_per_episode(meta: dict) -> float:
    return meta["wall_s"] / meta["episodes_run"] if meta.get("episodes_run") else float("nan")
