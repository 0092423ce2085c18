"""The study's stages, shared by the notebooks and the CLI, plus the papermill chain.

Each stage reads resolved `Params`, writes its artifacts under `params.run_dir` and skips
work already saved there, so any stage (and the whole chain) can be killed and re-run.

    run_dir/
      params.json               resolved params + versions (written by every stage)
      generate/<task>_<method>.jsonl   teacher episodes (all, successes flagged by reward)
      dataset/                  trajectories.jsonl, alpaca.json, chat.jsonl, card.json
      finetune/final/           fine-tuned model or adapter, train_log.csv, train_done.json (with its base model)
      eval/<condition>.jsonl    one record per episode; <condition>.meta.json: wall time, tool stats, model
      tables/, figures/, notebooks/
"""

from __future__ import annotations

import copy
import os
import platform
import random
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING

from .agent import run_episodes, summarize
from .config import AgentParams, Params, SearchParams, load_params, override
from .io import atomic_write_json, read_json
from .models import ModelId, check_same_model, model_id
from .tasks import eval_indices, load_task

if TYPE_CHECKING:
    import pandas as pd

    from .config import ModelParams

NOTEBOOKS = ("00_walkthrough", "01_generate_trajectories", "02_finetune", "03_evaluate", "04_scaling_and_robustness",
             "05_beyond_sft")
NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
META_EVERY_S = 30.0  # a condition's meta is rewritten this often while episodes finish: a kill loses at most this


def provenance(p: Params) -> dict:
    import torch
    import transformers

    from . import __version__

    return {"params": p.dump(), "fireact_utils": __version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "machine": machine_label(), "time": time.strftime("%Y-%m-%d %H:%M:%S")}


def save_provenance(p: Params, stage: str) -> None:
    atomic_write_json(p.run_dir / "provenance" / f"{stage}.json", provenance(p))


# ---------------------------------------------------------------- generation + dataset

def generation_indices(task, n: int, seed: int, held_out: frozenset[str] = frozenset()) -> list[int]:
    """Training questions: a seeded sample of the task's indices whose question (`holdout.question_key`)
    is not in `held_out`."""
    from .holdout import question_key

    pool = [i for i in range(len(task)) if question_key(task.questions[i]) not in held_out]
    return sorted(random.Random(seed).sample(pool, min(n, len(pool))))


def generate(p: Params, progress: bool = True) -> dict:
    """Run the teacher on training questions; return per task/method yield, turns and cost.

    Training questions are drawn outside every held-out set of the run (`holdout.reserved_keys`:
    its evaluation sets, the choice split, dev-500, HotpotQA-wiki val and test). A wiki task's
    teacher searches its Wikipedia corpus, so any question can get trajectories."""
    from .holdout import reserved_keys
    from .llm import make_llm
    from .tools import make_search

    g = p.generate
    out: dict = {}
    if g.n_questions == 0:
        return out
    teacher = make_llm(g.teacher, p.model, p.agent.batch_size)
    held_out = reserved_keys(p)
    for task_name in g.tasks:
        task = load_task(task_name, g.split, p.data_dir, p.multihop_dir)
        search = make_search(p.search, p.data_dir, task.corpus, p.multihop_dir)
        idx = generation_indices(task, g.n_questions, g.seed, held_out)
        for method in g.methods:
            ap = p.agent.model_copy(update={"method": method, "mode": "fewshot"})
            recs = run_episodes(task, idx, teacher, search, ap, p.run_dir / "generate" / f"{task_name}_{method}.jsonl",
                                progress=progress)
            s = summarize(recs)
            cost = (s["prompt_tokens"] * g.teacher.price_per_1k_prompt
                    + s["completion_tokens"] * g.teacher.price_per_1k_completion) / 1000 * s["n"]
            out[f"{task_name}:{method}"] = {"n": s["n"], "successes": sum(r["reward"] for r in recs),
                                            "yield": s["em"], "turns": s["turns"], "cost_usd": cost,
                                            "prompt_tokens": s["prompt_tokens"], "completion_tokens": s["completion_tokens"],
                                            "environment": search.card()}
    atomic_write_json(p.run_dir / "generate" / "summary.json", out)
    return out


def dataset_pool(p: Params) -> tuple[list[dict], dict[str, dict]]:
    """Every training trajectory available before mixing: the released source's and the run's
    generated successes; with the environment card of each source."""
    from .data import FIREACT_ENVIRONMENT, load_dataset_source

    recs = load_dataset_source(p.dataset.source, p.data_dir, fmt=p.train.format) if p.dataset.source else []
    envs = {p.dataset.source: FIREACT_ENVIRONMENT} if p.dataset.source.startswith("fireact:") else {}
    summary = p.run_dir / "generate" / "summary.json"
    generated = read_json(summary) if summary.is_file() else {}
    for f in sorted((p.run_dir / "generate").glob("*.jsonl")):
        recs += load_dataset_source(str(f))
        envs[f.name] = generated.get(":".join(f.stem.rsplit("_", 1)), {}).get("environment", {})
    if not recs:
        raise ValueError("no training trajectories: set dataset.source or generate.n_questions > 0")
    return recs, envs


def build_dataset(p: Params, tok=None) -> list[dict]:
    """Released and/or generated successes, mixed per `p.dataset`, saved with its card."""
    from .data import mix, save_dataset

    recs, envs = dataset_pool(p)
    recs = mix(recs, p.dataset.mixture or None, p.dataset.n_trajectories, p.dataset.seed, p.dataset.tasks)
    save_dataset(recs, p.run_dir / "dataset", tok, envs)
    save_provenance(p, "dataset")
    return recs


# ---------------------------------------------------------------- fine-tuning

def training_records(p: Params) -> list[dict]:
    """The run's fine-tuning data: the saved dataset, built first if need be."""
    from .data import load_dataset_source

    ds = p.run_dir / "dataset" / "trajectories.jsonl"
    return load_dataset_source(str(ds)) if ds.is_file() else build_dataset(p)


def finetune(p: Params, records: list[dict] | None = None, out: str | Path | None = None) -> Path:
    """Fine-tune on `records` (default: the run's dataset) into `out` (default <run>/finetune);
    provenance/<out's path in the run, joined by _>.json says with what. Refused when a record's
    question is held out (`holdout.check_training`): every fine-tune of the kit passes here."""
    from .holdout import check_training, without_held_out
    from .train import finetune as sft

    if records is None:
        records = training_records(p)
    if p.dataset.drop_held_out:
        records = without_held_out(p, records)
    check_training(p, [r["question"] for r in records], f"fine-tuning data of {Path(out or p.run_dir / 'finetune')}")
    out = Path(out or p.run_dir / "finetune")
    # One record per fine-tune: a seed's, a recipe's or a sweep's must not overwrite the main one's.
    where = out.relative_to(p.run_dir).parts if out.is_relative_to(p.run_dir) else (out.name,)
    save_provenance(p, "_".join(where))
    return sft(records, out, p.train, p.model)


# ---------------------------------------------------------------- evaluation

def check_task(p: Params):
    """Load the evaluation task (and so validate its file) before any model is loaded."""
    return load_task(p.evaluate.task, p.evaluate.split, p.data_dir, p.multihop_dir)


def run_condition(p: Params, name: str, llm, agent: AgentParams, search: SearchParams | None = None,
                  task: str | None = None, n: int | None = None, progress: bool = True,
                  split: str | None = None) -> list[dict]:
    """Evaluate one condition on the first n questions of the seeded shuffle; resumable by name.
    `task` (default evaluate.task and split) runs `split`, or its default split.

    `<name>.meta.json` holds wall time and tool counts summed over resumed runs (rewritten every
    META_EVERY_S while episodes finish, so a killed run's are kept), the environment card, the
    model (`llm_model`: spec, fingerprint, dtype; a saved condition resumes only with its own), and
    for wiki tasks the fidelity of all episodes (`wiki.fidelity`). A wiki task is always
    searched in its own corpus; `search` (default p.search) sets k, observation length and noise.
    """
    from .tools import NoisyTool, make_search
    from .wiki import WikiSearch, fidelity

    t, idx = condition_questions(p, task, split, n)
    sp = search or p.search
    tool = make_search(sp, p.data_dir, t.corpus, p.multihop_dir) if agent.method in ("react", "reflexion") else None
    path = p.run_dir / "eval" / f"{name}.jsonl"
    meta_path = path.with_suffix(".meta.json")
    base = read_json(meta_path) if meta_path.is_file() else {"wall_s": 0.0, "episodes_run": 0}
    model, dtype = llm_model(llm)
    if path.is_file() and path.stat().st_size:  # a saved episode: continue only with its settings and model
        check_same_agent(base.get("agent", {}), agent, path)
        check_same_model(saved_model(base), model, path)
    t0 = flushed = time.time()
    ran = 0

    def write_meta(recs: list[dict] | None = None) -> None:
        """`base` plus this run so far; fidelity (all episodes) only once `recs` are in."""
        meta = copy.deepcopy(base)
        dt = time.time() - t0
        meta["wall_s"] += dt
        meta["episodes_run"] += ran
        if ran:  # a condition resumed elsewhere mixes machines: its seconds say so (`table_extras`)
            here = meta.setdefault("machines", {}).setdefault(machine_label(), {"episodes": 0, "wall_s": 0.0})
            here["episodes"] += ran
            here["wall_s"] += dt
        if tool is not None:
            meta["tool"] = merge_tool_stats(base.get("tool"), tool.stats())
            meta["environment"] = tool.card()
            wiki = tool.tool if isinstance(tool, NoisyTool) else tool
            if recs is not None and t.gold_titles is not None and isinstance(wiki, WikiSearch):
                meta["fidelity"] = fidelity(recs, t.gold_titles, wiki)
        else:
            meta["environment"] = {"search": "none"}
        meta.update(condition=name, model=model.spec, model_fingerprint=model.fingerprint, model_dtype=dtype,
                    agent=agent.model_dump(), task=t.name, split=t.split)
        atomic_write_json(meta_path, meta)

    def saved(_rec: dict) -> None:
        """Counts a saved episode; rewrites the meta now and then, so a killed run keeps its seconds."""
        nonlocal ran, flushed
        ran += 1
        if time.time() - flushed >= META_EVERY_S:
            write_meta()
            flushed = time.time()

    recs = run_episodes(t, idx, llm, tool, agent, path, progress=progress, fewshot=fewshot_text(p, agent, t),
                        on_saved=saved)
    if ran or "environment" not in base or "model_fingerprint" not in base:  # a meta older than fingerprints gets one
        write_meta(recs)
    return recs


def llm_model(llm) -> tuple[ModelId, str | None]:
    """(model, dtype) of `llm` for a condition's meta. A local backend (it carries its
    `model_params`) is fingerprinted; another (HTTP, a test's script) is its name alone. The
    dtype is recorded, not compared: like the batch size, it changes float roundings, not the model
    (`recipes.seed_model` decodes in bf16 what trained in fp32)."""
    from .models import pick_device, pick_dtype

    mp = getattr(llm, "model_params", None)
    if mp is None:
        return ModelId(llm.name), None
    dtype = str(pick_dtype(mp.dtype, pick_device(mp.device))).removeprefix("torch.")
    return model_id(mp.name, mp.adapter, mp.cache_dir), dtype


def saved_model(meta: dict) -> ModelId | None:
    """The model a condition's meta records; None for a meta older than the record."""
    return ModelId(meta["model"], meta.get("model_fingerprint")) if meta.get("model") else None


def check_same_agent(saved: dict, agent: AgentParams, path: Path) -> None:
    """A condition continues only with the agent settings it began with (`saved`: its meta's), so
    one name never mixes two; the batch size, which only reorders float sums, may change."""
    now = agent.model_dump()
    differ = [k for k in now if k != "batch_size" and k in saved and saved[k] != now[k]]
    if differ:
        changes = ", ".join(f"agent.{k} {saved[k]!r} -> {now[k]!r}" for k in differ)
        raise ValueError(f"{path} was run with other agent settings ({changes}): "
                         "run it with its own, or pick a new run name")


def machine_label() -> str:
    """Where this process computes: the GPU's name, else the CPU's core count."""
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu x{os.cpu_count()}"


def condition_questions(p: Params, task: str | None = None, split: str | None = None, n: int | None = None):
    """(task, indices) of a condition: `task` (default evaluate.task and split) and the first n
    (default evaluate.n_questions) of its seeded shuffle."""
    t = load_task(task or p.evaluate.task, split if task else p.evaluate.split, p.data_dir, p.multihop_dir)
    return t, eval_indices(t, n or p.evaluate.n_questions, p.evaluate.seed)


def saved_condition(p: Params, name: str, task: str | None = None, split: str | None = None,
                    n: int | None = None, model: ModelParams | None = None) -> list[dict] | None:
    """The condition's saved records, in question order, if every question is done; else None.
    Lets a resumed study skip loading (or training) a model whose evaluation is complete; with
    `model`, the records must be its, where its weights are on this machine (no model is needed
    to reuse them, so one that is not here is not compared)."""
    from .agent import episode_id, load_done

    t, idx = condition_questions(p, task, split, n)
    path = p.run_dir / "eval" / f"{name}.jsonl"
    done = load_done(path)
    ids = [episode_id(t, i) for i in idx]
    if any(i not in done or done[i]["status"] == "api_error" for i in ids):
        return None
    if model is not None and (now := model_id(model.name, model.adapter, model.cache_dir)).fingerprint:
        check_same_model(saved_model(condition_meta(p, name)), now, path)
    return [done[i] for i in ids]


def fewshot_text(p: Params, agent: AgentParams, task) -> str | None:
    """The few-shot prompt of `agent` when it is not the kit's own: agent.exemplars=fireact gives
    ReAct on a qa task FireAct's HotpotQA trajectories; other methods and kinds keep the kit's."""
    from .data import fireact_exemplars
    from .tasks import fewshot_prompt

    if agent.mode != "fewshot" or agent.exemplars == "kit" or agent.method not in ("react", "reflexion") \
            or task.kind != "qa":
        return None
    return fewshot_prompt("qa", "react", exemplars=fireact_exemplars(agent.n_exemplars, p.data_dir))


def merge_tool_stats(old: dict | None, new: dict) -> dict:
    """Tool statistics of a resumed condition: counts summed; rates (fractions of calls) averaged
    with the calls as weights, so they cover every run, not only the last."""
    if not old:
        return dict(new)
    out = dict(new)
    calls_old, calls_new = old.get("calls", 0), new.get("calls", 0)
    for k, v in new.items():
        if k not in old or isinstance(v, bool) or not isinstance(v, int | float):
            continue
        if k.endswith("_rate") and k != "noise_rate":
            total = calls_old + calls_new
            out[k] = (old[k] * calls_old + v * calls_new) / total if total else 0.0
        elif isinstance(v, int) and k != "recorded_pairs":  # a size, not a count of calls
            out[k] = old[k] + v
    return out


def hand_edit(meta: dict) -> str | None:
    """A condition meta's note that a person edited it (`edited_by_hand`; older metas: `repaired`),
    so every table and figure showing its numbers can mark them."""
    note = meta.get("edited_by_hand") or meta.get("repaired")
    return None if not note else note if isinstance(note, str) else "meta repaired by hand"


def condition_meta(p: Params, name: str) -> dict:
    f = p.run_dir / "eval" / f"{name}.meta.json"
    return read_json(f) if f.is_file() else {}


def agent_model(p: Params, trained: str | Path | None = None) -> ModelParams:
    """The base model (trained=None) or the fine-tuned one (its adapter on the base, or its dir)."""
    from .train import adapter_model_params

    return adapter_model_params(p.model, trained) if trained else p.model


def local_llm(p: Params, trained: str | Path | None = None):
    """`agent_model` on the local backend (which carries it as `model_params`, so each condition
    records and checks the model it ran: `llm_model`)."""
    from .llm import local_backend

    return local_backend(agent_model(p, trained), p.agent.batch_size)


def finetuned_agent(p: Params) -> AgentParams:
    return p.agent.model_copy(update={"method": "react", "mode": "finetuned", "format": p.train.format})


def fewshot_react(p: Params) -> AgentParams:
    return p.agent.model_copy(update={"method": "react", "mode": "fewshot"})


def searching_react(p: Params) -> AgentParams:
    """Few-shot ReAct with evaluate.searching_baseline's overrides: the baseline that must search."""
    return fewshot_react(override(p, p.evaluate.searching_baseline, "evaluate.searching_baseline"))


SEARCHING = "base_fewshot_searching_react"  # the few-shot ReAct baseline of evaluate.searching_baseline


def evaluate(p: Params, trained: str | Path, progress: bool = True) -> dict[str, list[dict]]:
    """Few-shot baselines of the base model (and evaluate.searching_baseline's ReAct prompt, which
    must search) and the fine-tuned agent, on the same questions; its EM goes on its model card."""
    from .train import record_results

    conds: dict[str, list[dict]] = {}
    base = local_llm(p)
    for m in p.evaluate.methods:
        ap = p.agent.model_copy(update={"method": m, "mode": "fewshot"})
        conds[f"base_fewshot_{m}"] = run_condition(p, f"base_fewshot_{m}", base, ap, progress=progress)
    if p.evaluate.searching_baseline:
        conds[SEARCHING] = run_condition(p, SEARCHING, base, searching_react(p), progress=progress)
    del base
    ft = local_llm(p, trained)
    conds["finetuned_react"] = run_condition(p, "finetuned_react", ft, finetuned_agent(p), progress=progress)
    record_results(trained, "finetuned_react", f"{p.evaluate.task} {p.evaluate.split}", conds["finetuned_react"])
    save_provenance(p, "evaluate")
    return conds


def paired_gain(p: Params, conds: dict[str, list[dict]], base: str = "base_fewshot_react",
                ft: str = "finetuned_react", save: bool = True) -> dict:
    """EM of `ft` minus `base` on the same questions with a paired bootstrap 95% CI, overall and
    per question type (`by_type`: two-option questions are half won by a coin), saved to
    tables/paired_gain.json when `save`."""
    from .evaluate import episode_values, paired_bootstrap_diff, question_type

    def gain(keep) -> dict:
        pairs = [(a, b) for a, b in zip(conds[base], conds[ft], strict=True) if keep(b)]
        mean, lo, hi = paired_bootstrap_diff(*(episode_values(list(x), "em") for x in zip(*pairs, strict=True)),
                                             p.evaluate.bootstrap)
        return {"n": len(pairs), "gain": mean, "lo": lo, "hi": hi}

    if [r["id"] for r in conds[base]] != [r["id"] for r in conds[ft]]:
        raise ValueError(f"{base} and {ft} must cover the same questions in the same order")
    types = sorted({question_type(r) for r in conds[ft]})
    out = {"metric": "em", "baseline": base, "treatment": ft, **gain(lambda r: True), "bootstrap": p.evaluate.bootstrap,
           "by_type": {t: gain(lambda r, t=t: question_type(r) == t) for t in types}}
    if save:
        atomic_write_json(p.run_dir / "tables" / "paired_gain.json", out)
    return out


def gain_summary(gain: dict) -> str:
    """`paired_gain`'s result as Markdown: the gain with its CI, then per question type."""
    from .evaluate import TYPE_HEADERS, fmt_ci

    head = (f"**{condition_label(gain['treatment'])} minus {condition_label(gain['baseline'])}**: "
            f"{fmt_ci(gain['gain'], gain['lo'], gain['hi'])} EM points (95% CI, {gain['n']} questions)")
    return head + "".join(f"\n- {TYPE_HEADERS[t].split(' EM')[0]} questions ({g['n']}): "
                          f"{fmt_ci(g['gain'], g['lo'], g['hi'])}" for t, g in gain.get("by_type", {}).items())


NOISE_SAYS = {"none": '"None"', "random": "random other obs"}  # what a corrupted observation becomes


def condition_label(name: str) -> str:
    """'gen_hotpotqa-wiki_ft' -> 'hotpotqa-wiki: FireAct fine-tuned ReAct'; a noisy condition says what
    happened to the observations ('finetuned_react_noise_none_0.5' -> 'FireAct fine-tuned ReAct, 50% of
    obs -> "None"'), since 'noise none 0.5' read as no noise; other names spelled out."""
    labels = {"base_fewshot_io": "base few-shot IO", "base_fewshot_cot": "base few-shot CoT",
              "base_fewshot_react": "base few-shot ReAct", SEARCHING: "base few-shot ReAct, must search",
              "finetuned_react": "FireAct fine-tuned ReAct"}
    if m := re.fullmatch(r"(base_fewshot_searching|base_fewshot|finetuned)_react(?:_(.+))?_noise_(none|random)_([0-9.e-]+)", name):
        who, task, kind, rate = m.groups()
        agent = f"{labels[who + '_react']}, {float(rate) * 100:g}% of obs -> {NOISE_SAYS[kind]}"
        return f"{task}: {agent}" if task else agent
    if name.startswith("gen_") and name.endswith(("_base", "_ft")):
        task, _, who = name[4:].rpartition("_")
        return f"{task}: " + labels["base_fewshot_react" if who == "base" else "finetuned_react"]
    return labels.get(name, name.replace("_", " "))


def table_extras(p: Params, names) -> dict[str, dict]:
    """Columns beside each condition: seconds/episode and the replayed-search hit rates."""
    out = {}
    for n in names:
        m = condition_meta(p, n)
        row = {}
        if m.get("episodes_run"):
            row["seconds_per_episode"] = m["wall_s"] / m["episodes_run"]
        if m.get("machines"):
            row["machine"] = " + ".join(m["machines"])  # seconds compare only within one machine
        if note := hand_edit(m):
            row["edited_by_hand"] = note
        tool = m.get("tool") or {}
        if "hit_rate" in tool:
            row["search_exact_hit_rate"] = tool["hit_rate"]
            row["search_bm25_rate"] = tool.get("bm25_rate")
        if "noise_rate" in tool:
            row["noise_rate"] = tool["noise_rate"]
            row["noise_kind"] = tool.get("noise_kind")
            row["noise_corrupted"] = tool.get("noise_corrupted")  # observations actually corrupted
        fid = m.get("fidelity") or {}
        if fid:
            row["gold_top_rate"] = fid["gold_top_rate"]
            row["saw_all_gold_rate"] = fid["saw_all_gold_rate"]
        if m.get("environment"):
            row["environment"] = environment_label(m["environment"])
        agent = m.get("agent") or {}
        if agent:  # lets plots tell prompted from fine-tuned agents without parsing names
            row["mode"], row["method"] = agent.get("mode"), agent.get("method")
        out[condition_label(n)] = row
    return out


def environment_label(card: dict) -> str:
    """One line of an environment card, for table columns: 'wiki hotpotqa (10,708 paragraphs), BM25 ...'."""
    if card.get("search") in (None, "none"):
        return "no search"
    return (f"{card['search']}: {card['corpus']}; {card['retriever']}; k={card['k']}; "
            f"{card['max_obs_chars']} chars; noise {card['noise']}")


def outcome_table(p: Params) -> pd.DataFrame:
    """Every wiki condition of the run (those with fidelity in their meta): the environment's
    fidelity (gold-top rate of searches, episodes that saw any / every gold paragraph) and the
    episodes by outcome (correct / saw evidence, wrong answer / missed evidence / never finished)."""
    import pandas as pd

    rows = []
    for f in sorted((p.run_dir / "eval").glob("*.meta.json")):
        m = read_json(f)
        if fid := m.get("fidelity"):
            rows.append({"condition": condition_label(m["condition"]), "task": m["task"], "split": m["split"],
                         "noise": (m.get("environment") or {}).get("noise"),
                         **{k: fid[k] for k in ("gold_top_rate", "saw_any_gold_rate", "saw_all_gold_rate")},
                         **fid["outcomes"]})
    return pd.DataFrame(rows)


def condition_table(p: Params, conds: dict[str, list[dict]]):
    """`evaluate.results_table` of conditions keyed by run name: labelled rows, CIs with
    `evaluate.bootstrap` resamples, and the `table_extras` columns."""
    from .evaluate import results_table

    labelled = {condition_label(k): v for k, v in conds.items()}
    return results_table(labelled, p.evaluate.bootstrap, extra=table_extras(p, conds))


# ---------------------------------------------------------------- study (notebook 04)

MIN_CORRUPTED = 20  # a noisy run with fewer corrupted observations measures searching, not robustness


def noise_conditions(p: Params, trained: str | Path, task: str | None = None,
                     progress: bool = True) -> dict[str, list[dict]]:
    """The fine-tuned agent (and, if asked, the few-shot base: on the main task also its prompt that
    must search, whose episodes see the noise) with a noisy search tool on `task` (default
    evaluate.task; another task runs study.generalization_n of its questions)."""
    conds: dict[str, list[dict]] = {}
    runs = [("finetuned", trained, finetuned_agent(p))]
    main = task in (None, p.evaluate.task)
    if p.study.noisy_fewshot:
        runs.append(("base_fewshot", None, fewshot_react(p)))
        if main and p.evaluate.searching_baseline:
            runs.append(("base_fewshot_searching", None, searching_react(p)))
    # The main task keeps the names it always had; another task's conditions carry its name.
    tag, n = ("", None) if main else (f"_{_slug(task)}", _n_questions(p, task))
    for label, model, ap in runs:
        llm = local_llm(p, model)
        for kind in p.study.noise_kinds:
            for rate in p.study.noise_rates:
                sp = p.search.model_copy(update={"noise_rate": rate, "noise_kind": kind})
                name = f"{label}_react{tag}_noise_{kind}_{rate:g}"
                conds[name] = run_condition(p, name, llm, ap, sp, None if main else task, n, progress=progress)
    return conds


def robustness(p: Params, trained: str | Path, progress: bool = True) -> dict[str, pd.DataFrame]:
    """Per task of study.noise_tasks (default: evaluate.task), e.g. the replay's HotpotQA and
    HotpotQA-wiki: a condition table of the clean ReAct agents and each noisy condition, with
    `noise_effects`' columns (paired EM vs the clean agent, too few corrupted observations)."""
    tables = {}
    for task in p.study.noise_tasks or [p.evaluate.task]:
        if task == p.evaluate.task:
            names = {"base_fewshot": "base_fewshot_react", "base_fewshot_searching": SEARCHING,
                     "finetuned": "finetuned_react"}
            clean = {k: v for k, v in evaluate(p, trained, progress).items() if k in names.values()}
        else:
            names = {"base_fewshot": f"gen_{_slug(task)}_base", "finetuned": f"gen_{_slug(task)}_ft"}
            clean = transfer_pair(p, trained, task, progress)
        noisy = noise_conditions(p, trained, task, progress)
        by_agent = {who: clean[n] for who, n in names.items() if n in clean}
        tables[task] = noise_effects(condition_table(p, clean | noisy), noisy, by_agent, p.evaluate.bootstrap)
    return tables


def noise_effects(table: pd.DataFrame, noisy: dict[str, list[dict]], clean: dict[str, list[dict]],
                  n_boot: int) -> pd.DataFrame:
    """`table` (`condition_table` of clean and noisy runs) plus, beside each run of `noisy` (name ->
    records): `vs_clean` [`_lo`, `_hi`], its EM minus the clean EM of the same agent (`clean` keyed
    'finetuned' / 'base_fewshot', the name's prefix), paired by record id with a 95% bootstrap CI;
    and `too_few_corrupted` with a `note`: under MIN_CORRUPTED corrupted observations, a flat EM
    says the agent barely searched, not that it is robust."""
    import pandas as pd

    from .evaluate import paired_bootstrap_diff

    corrupted = dict(zip(table["condition"], table.get("noise_corrupted", [None] * len(table)), strict=True))
    rows = {}
    for name, recs in noisy.items():
        ref = {r["id"]: r["em"] for r in clean.get(name.split("_react")[0], [])}
        pairs = [(ref[r["id"]], r["em"]) for r in recs if r["id"] in ref]
        diff = paired_bootstrap_diff([a for a, _ in pairs], [b for _, b in pairs], n_boot)  # noisy - clean
        k = corrupted.get(condition_label(name))
        note = ("corrupted observations not recorded" if pd.isna(k) else
                (f"only {k:.0f} corrupted observation{'' if k == 1 else 's'} (< {MIN_CORRUPTED}) in {len(recs)} "
                 "episodes: the agent barely searched") if k < MIN_CORRUPTED else None)
        rows[condition_label(name)] = {"vs_clean": diff[0], "vs_clean_lo": diff[1], "vs_clean_hi": diff[2],
                                       "too_few_corrupted": note is not None, "note": note}
    cols = pd.DataFrame.from_dict(rows, orient="index",
                                  columns=["vs_clean", "vs_clean_lo", "vs_clean_hi", "too_few_corrupted", "note"])
    out = table.merge(cols, left_on="condition", right_index=True, how="left")
    return out.assign(too_few_corrupted=out["too_few_corrupted"].eq(True))  # clean rows: False


def robustness_markdown(table: pd.DataFrame) -> str:
    """A `robustness` table in Markdown: EM and the paired difference vs the clean agent (points,
    95% CIs) beside the corrupted-observation count; rows with too few corrupted observations are
    greyed with their reason, so no one reads them as robustness."""
    import pandas as pd

    from .evaluate import fmt_ci

    lines = ["| condition | n | EM % [95% CI] | corrupted obs | EM vs clean, points [95% CI] |", "|---|---|---|---|---|"]
    for _, r in table.iterrows():
        k, d = r.get("noise_corrupted"), r.get("vs_clean")
        cells = [str(r["condition"]), str(r["n"]), fmt_ci(r["em"], r["em_lo"], r["em_hi"]),
                 "clean tool" if pd.isna(k) else f"{k:.0f}",
                 "" if pd.isna(d) else fmt_ci(d, r["vs_clean_lo"], r["vs_clean_hi"])]
        if bool(r.get("too_few_corrupted", False)):  # a bool column (`noise_effects`)
            cells[0] += f" (greyed: {r['note']})"
            cells = [f'<span style="color:grey">{c}</span>' for c in cells]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + (f"\n\nGrey: fewer than {MIN_CORRUPTED} corrupted observations, too few to measure "
                               "robustness; left out of the figure.\n")


def _slug(task: str) -> str:
    return task.replace(":", "_").replace("/", "_")


def _task(p: Params, name: str):
    return load_task(name, None, p.data_dir, p.multihop_dir)


def scaling_runs(p: Params) -> dict[int, tuple[Params, list[dict], Path]]:
    """Per N in study.data_sizes: params, the first N trajectories and the dir to fine-tune into.
    An N whose trajectories are the main dataset's uses the main fine-tune (`finetune/`): same
    data, same recipe, so it is trained once."""
    import json

    from .data import load_dataset_source, mix

    def canonical(recs: list[dict]) -> list[str]:  # the same records in any order compare equal
        return sorted(json.dumps(r, sort_keys=True) for r in recs)

    main = p.run_dir / "dataset" / "trajectories.jsonl"
    main_recs = canonical(load_dataset_source(str(main))) if main.is_file() else None
    source, _ = dataset_pool(p)  # released and generated: a size above the released 500 can work
    runs = {}
    for n in p.study.data_sizes:
        q = p.model_copy(update={"dataset": p.dataset.model_copy(update={"n_trajectories": n})})
        recs = mix(source, q.dataset.mixture or None, n, q.dataset.seed, q.dataset.tasks)
        same = canonical(recs) == main_recs
        runs[n] = (q, recs, p.run_dir / "finetune" if same else p.run_dir / "scaling" / f"n{n}")
    return runs


def data_scaling(p: Params, progress: bool = True) -> dict[int, list[dict]]:
    """Fine-tune on the first N trajectories for each N in study.data_sizes; evaluate each."""
    out = {}
    for n, (q, recs, out_dir) in scaling_runs(p).items():
        trained = finetune(q, recs, out_dir)
        out[n] = run_condition(p, f"scaling_n{n}", local_llm(p, trained), finetuned_agent(p), progress=progress)
    return out


def mixtures(p: Params, progress: bool = True) -> dict[str, list[dict]]:
    """Fine-tune on each FireAct dataset in study.mixtures (label -> fireact:<name>); evaluate each."""
    from .data import load_dataset_source, mix

    out = {}
    for label, source in p.study.mixtures.items():
        recs = mix(load_dataset_source(source, p.data_dir, p.train.format), None, None, p.dataset.seed)
        trained = finetune(p, recs, p.run_dir / "mixtures" / label)
        out[label] = run_condition(p, f"mix_{label}", local_llm(p, trained), finetuned_agent(p), progress=progress)
    return out


def _n_questions(p: Params, task: str) -> int:
    return p.study.generalization_n or len(_task(p, task))


def transfer_pair(p: Params, trained: str | Path, task: str, progress: bool = True) -> dict[str, list[dict]]:
    """Base few-shot ReAct and the fine-tuned agent on `task` (its default split, study.generalization_n
    questions; a wiki task in its own Wikipedia corpus), named gen_<task>_base / gen_<task>_ft."""
    slug, n = _slug(task), _n_questions(p, task)
    return {f"gen_{slug}_base": run_condition(p, f"gen_{slug}_base", local_llm(p), fewshot_react(p), task=task, n=n,
                                              progress=progress),
            f"gen_{slug}_ft": run_condition(p, f"gen_{slug}_ft", local_llm(p, trained), finetuned_agent(p), task=task,
                                            n=n, progress=progress)}


GENERALIZATION_LABELS = {"base": "base few-shot ReAct", "ft": "FireAct fine-tuned"}


def generalization(p: Params, trained: str | Path, progress: bool = True) -> dict[str, dict[str, list[dict]]]:
    """Base few-shot ReAct vs fine-tuned on each of study.generalization_tasks (`transfer_pair`)."""
    out: dict[str, dict[str, list[dict]]] = {}
    for task in p.study.generalization_tasks:
        base, ft = transfer_pair(p, trained, task, progress).values()
        out[task] = {GENERALIZATION_LABELS["base"]: base, GENERALIZATION_LABELS["ft"]: ft}
    return out


def generalization_table(p: Params, gen: dict[str, dict[str, list[dict]]]) -> pd.DataFrame:
    """`generalization`'s results per task, with each condition's environment and fidelity columns."""
    from .evaluate import grouped_results_table

    extra = {}
    for task in gen:
        names = {label: f"gen_{_slug(task)}_{who}" for who, label in GENERALIZATION_LABELS.items()}
        cols = table_extras(p, names.values())
        extra[task] = {label: cols[condition_label(n)] for label, n in names.items()}
    return grouped_results_table(gen, p.evaluate.bootstrap, "task", extra)


# ---------------------------------------------------------------- papermill chain

def run_chain(params_file: str | Path, overrides: list[str] | None = None, notebooks=NOTEBOOKS,
              html: bool = True, redo: bool = False) -> Path:
    """Execute the notebooks in order into run_dir/notebooks/. A notebook whose executed copy
    finished (marker file) is skipped, so a killed chain resumes at the first unfinished one."""
    import papermill as pm

    p = load_params(params_file, overrides)  # fail on bad params before any kernel starts
    nb_dir = p.run_dir / "notebooks"
    nb_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(p.run_dir / "params.json", provenance(p))
    os.environ.setdefault("TQDM_DISABLE", "1")  # the kernels inherit it: no progress-bar lines in the saved HTML
    kernel = chain_kernel()
    for nb in notebooks:
        done = nb_dir / f"{nb}.done"
        if done.is_file() and not redo:
            print(f"[skip] {nb} (already executed; delete {done} to redo)")
            continue
        t0 = time.time()
        out = nb_dir / f"{nb}.ipynb"
        pm.execute_notebook(str(NOTEBOOK_DIR / f"{nb}.ipynb"), str(out), cwd=str(NOTEBOOK_DIR),
                            parameters={"params_file": str(Path(params_file).resolve()),
                                        "overrides": list(overrides or [])},
                            kernel_name=kernel, progress_bar=False)
        if html:
            export_html(out)
        atomic_write_json(done, {"seconds": time.time() - t0, "kernel": kernel})
        print(f"[done] {nb} in {time.time() - t0:.0f}s")
    return p.run_dir


def chain_kernel() -> str:
    """The Jupyter kernel the chain runs in: `fireact` (the .venv kernel `make setup` registers) when
    it runs this interpreter, else the default `python3`. A `fireact` spec left by another clone (or
    by a deleted one) would run other code, or nothing."""
    import sys

    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        argv = KernelSpecManager().get_kernel_spec("fireact").argv
    except NoSuchKernel:
        return "python3"
    return "fireact" if Path(argv[0]).absolute() == Path(sys.executable).absolute() else "python3"


def export_html(ipynb: Path) -> Path:
    import nbformat
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter().from_notebook_node(nbformat.read(str(ipynb), as_version=4))
    out = ipynb.with_suffix(".html")
    out.write_text(body, encoding="utf-8")
    return out
