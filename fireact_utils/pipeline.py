"""The study's stages, shared by the notebooks and the CLI: generate, build the dataset, fine-tune,
evaluate (one condition, or the baselines and the fine-tuned agent).

Each stage reads resolved `Params`, writes its artifacts under `params.run_dir` and skips
work already saved there, so any stage (and the whole chain, `chain.run_chain`) can be killed and
re-run. Sweeps built on these stages are in `studies`, the tables in `tables`, what each artifact
records about its making in `provenance`.

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
import functools
import random
import time
from pathlib import Path
from typing import TYPE_CHECKING

from . import keys
from .agent import run_episodes, summarize
from .config import AgentParams, Params, SearchParams, override
from .io import atomic_write_json, read_json
from .models import ModelId
from .provenance import (
    condition_key,
    condition_meta,
    llm_model,
    local_decoder,
    machine_label,
    merge_tool_stats,
    save_provenance,
)
from .tasks import eval_indices, load_task, saved_task

if TYPE_CHECKING:
    from .config import ModelParams

META_EVERY_S = 30.0  # a condition's meta is rewritten this often while episodes finish: a kill loses at most this


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
    generated successes (unless dataset.teacher_episodes is false); with the environment card of each source."""
    from .data import FIREACT_ENVIRONMENT, load_dataset_source

    recs = load_dataset_source(p.dataset.source, p.data_dir, fmt=p.train.format) if p.dataset.source else []
    envs = {p.dataset.source: FIREACT_ENVIRONMENT} if p.dataset.source.startswith("fireact:") else {}
    summary = p.run_dir / "generate" / "summary.json"
    generated = read_json(summary) if summary.is_file() else {}
    for f in sorted((p.run_dir / "generate").glob("*.jsonl")) if p.dataset.teacher_episodes else []:
        recs += load_dataset_source(str(f))
        envs[f.name] = generated.get(":".join(f.stem.rsplit("_", 1)), {}).get("environment", {})
    if not recs:
        raise ValueError("no training trajectories: set dataset.source or generate.n_questions > 0")
    return recs, envs


def build_dataset(p: Params, tok=None) -> list[dict]:
    """Released and/or generated successes, mixed per `p.dataset`, saved with its card; a saved
    dataset is reused under its key (dataset.*, train.format, the pool's content), else refused."""
    from .data import load_dataset_source, mix, save_dataset

    recs, envs = dataset_pool(p)
    out = p.run_dir / "dataset"
    now = keys.make("dataset", {**keys.flat(p.dataset, "dataset."), "train.format": p.train.format,
                                "pool": keys.data_hash(recs)})
    if keys.reuse(out / keys.KEY_FILE, now, [out], exists=(out / "trajectories.jsonl").is_file()):
        return load_dataset_source(str(out / "trajectories.jsonl"))
    recs = mix(recs, p.dataset.mixture or None, p.dataset.n_trajectories, p.dataset.seed, p.dataset.tasks)
    save_dataset(recs, out, tok, envs)
    keys.write(out / keys.KEY_FILE, now)
    save_provenance(p, "dataset")
    return recs


# ---------------------------------------------------------------- fine-tuning

def training_records(p: Params) -> list[dict]:
    """The run's fine-tuning data (`build_dataset`: the saved one where its key holds)."""
    return build_dataset(p)


def finetune(p: Params, records: list[dict] | None = None, out: str | Path | None = None) -> Path:
    """Fine-tune on `records` (default: the run's dataset) into `out` (default <run>/finetune);
    provenance/<out's path in the run, joined by _>.json says with what. Refused when a record's
    question is held out (`holdout.check_training`): every fine-tune of the kit passes here. Under
    `keys.saved_only` (a merge) it is the bundle's, whose data was read and checked where it trained."""
    from .holdout import check_training, without_held_out
    from .train import finetune as sft

    if keys.is_saved_only():
        records = None
    else:
        records = training_records(p) if records is None else records
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
    return run_task(p)


def run_task(p: Params, task: str | None = None, split: str | None = None):
    """`task` (default evaluate.task and split) from the data; under `keys.saved_only` (a merge,
    whose data may be nowhere here), as the run's saved episodes and metas show it (`saved_task`)."""
    name, split = task or p.evaluate.task, split if task else p.evaluate.split
    if keys.is_saved_only():
        eval_dir = p.run_dir / "eval"
        return _saved_task(name, split, eval_dir, tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns)
                                                        for f in sorted(eval_dir.glob("*.json*"))))
    return load_task(name, split, p.data_dir, p.multihop_dir)


@functools.lru_cache(maxsize=16)
def _saved_task(task: str, split: str | None, eval_dir: Path, files: tuple):
    return saved_task(task, split, *_saved(eval_dir, files))


@functools.lru_cache(maxsize=2)
def _saved(eval_dir: Path, _files: tuple) -> tuple[list[dict], list[dict]]:
    """eval_dir's episodes and metas, read once while its files stay as they were (`_files`)."""
    from .agent import load_done

    return ([r for f in sorted(eval_dir.glob("*.jsonl")) for r in load_done(f).values()],
            [read_json(f) for f in sorted(eval_dir.glob("*.meta.json"))])


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
    from .holdout import check_evaluation
    from .tools import NoisyTool, make_search
    from .wiki import WikiSearch, fidelity

    t, idx = condition_questions(p, task, split, n)
    check_evaluation(p, t, idx)  # the registered settings; no score on a split a choice was made on
    if keys.is_saved_only():  # a merge runs nothing: no model, tool or data, only what the bundles saved
        check_saved(p, name, t, idx)
        return saved_condition(p, name, task, split, n, agent=agent, search=search)
    sp = environment(p, t, agent, search)
    tool = make_search(sp, p.data_dir, t.corpus, p.multihop_dir) if sp is not None else None
    path = p.run_dir / "eval" / f"{name}.jsonl"
    meta_path = path.with_suffix(".meta.json")
    model, dtype = llm_model(llm)
    fewshot = fewshot_text(p, agent, t)
    now = condition_key(model, dtype, local_decoder(llm), agent, sp, t, fewshot, tool.card() if tool else None)
    saved = read_json(meta_path) if meta_path.is_file() else {}
    # a saved episode: continue only under the condition's key (model, agent, environment, decoding)
    keys.reuse(meta_path, now, [path], exists=path.is_file() and path.stat().st_size > 0, saved=saved.get("key"),
               where=path)
    base = read_json(meta_path) if meta_path.is_file() else {"wall_s": 0.0, "episodes_run": 0}
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
                meta["gold_titles"] = {r["id"]: t.gold_titles[r["idx"]] for r in recs}  # for a merge (`run_task`)
        else:
            meta["environment"] = {"search": "none"}
        meta.update(condition=name, model=model.spec, model_fingerprint=model.fingerprint, model_dtype=dtype,
                    agent=agent.model_dump(), task=t.name, split=t.split, task_size=len(t), key=now)
        atomic_write_json(meta_path, meta)

    def count(_rec: dict) -> None:
        """Counts a saved episode; rewrites the meta now and then, so a killed run keeps its seconds."""
        nonlocal ran, flushed
        ran += 1
        if time.time() - flushed >= META_EVERY_S:
            write_meta()
            flushed = time.time()

    recs = run_episodes(t, idx, llm, tool, agent, path, progress=progress, fewshot=fewshot, on_saved=count)
    if ran or "key" not in base:
        write_meta(recs)
    return recs


def check_saved(p: Params, name: str, task, idx: list[int]) -> None:
    """Under `keys.saved_only` (a merge), a condition with a question not saved (or saved as an
    api_error, which a resume would re-run) is a one-line error."""
    from .agent import episode_id, load_done

    done = load_done(p.run_dir / "eval" / f"{name}.jsonl")
    if missing := sum(done.get(episode_id(task, i), {}).get("status", "api_error") == "api_error" for i in idx):
        raise ValueError(f"condition {name}: {missing} of {len(idx)} questions have no saved episode in the merged "
                         "bundles; run the piece that makes it, then merge again")


def environment(p: Params, task, agent: AgentParams, search: SearchParams | None = None) -> SearchParams | None:
    """The search settings a condition's agent calls (None: an agent that does not search); a wiki
    task is searched in its own corpus, whatever search.kind says."""
    if agent.method not in ("react", "reflexion"):
        return None
    sp = search or p.search
    return sp.model_copy(update={"kind": "wiki", "corpus": task.corpus}) if task.corpus else sp


def condition_questions(p: Params, task: str | None = None, split: str | None = None, n: int | None = None):
    """(task, indices) of a condition: `task` (default evaluate.task and split) and the first n
    (default evaluate.n_questions) of its seeded shuffle."""
    t = run_task(p, task, split)
    return t, eval_indices(t, n or p.evaluate.n_questions, p.evaluate.seed)


def saved_condition(p: Params, name: str, task: str | None = None, split: str | None = None,
                    n: int | None = None, model: ModelParams | None = None,
                    agent: AgentParams | None = None, search: SearchParams | None = None) -> list[dict] | None:
    """The condition's saved records, in question order, if every question is done; else None.
    Lets a resumed study (or a merge of bundles) skip loading or training a model whose evaluation
    is complete. Its key must hold what is known here (`model` where its weights are on this
    machine, `agent`, the environment, task and few-shot prompt), else StaleOutputError."""
    from .agent import episode_id, load_done

    t, idx = condition_questions(p, task, split, n)
    path = p.run_dir / "eval" / f"{name}.jsonl"
    done = load_done(path)
    ids = [episode_id(t, i) for i in idx]
    if any(i not in done or done[i]["status"] == "api_error" for i in ids):
        return None
    if agent is not None:
        keys.check(condition_meta(p, name).get("key"), known_key(p, agent, t, model, search), path)
    elif model is not None:
        check_model(condition_meta(p, name).get("key"), known_model(model)[0], path)
    return [done[i] for i in ids]


def known_model(model: ModelParams | None) -> tuple[ModelId | None, str | None]:
    """(model, decoding dtype) as far as this machine knows them: weights that are not here are None."""
    if model is None or keys.is_saved_only():
        return None, None
    dtype = keys.model_settings(model, decoder=False)["model.dtype"]
    fp = keys.weights_fingerprint(model)
    return (ModelId(model.name, fp) if fp else None), dtype


def known_key(p: Params, agent: AgentParams, task, model: ModelParams | None = None,
              search: SearchParams | None = None) -> dict:
    """A condition's key as far as it is known without its tool or decoder (those, and a model whose
    weights are not here, are None: not compared), for checking saved episodes. Under
    `keys.saved_only` FireAct's exemplars are data, not read: that prompt is not compared either."""
    unread = keys.is_saved_only() and fireact_prompt(agent, task)
    key = condition_key(*known_model(model), None, agent, environment(p, task, agent, search), task,
                        None if unread else fewshot_text(p, agent, task))
    settings = {**key["settings"], "search.card": None, **({"fewshot": None} if unread else {})}
    if agent.temperature > 0:
        settings["model.decoder"] = None
    return {**key, "settings": settings}


def check_model(saved: dict | None, model: ModelId | None, path: Path) -> None:
    """A saved condition's key names `model`'s weights (not compared where they are not here)."""
    if model is not None and saved is not None:
        unknown = dict.fromkeys(saved.get("settings", {}))
        keys.check(saved, {"stage": "condition", "settings": {**unknown, "model": model.fingerprint}}, path)
    elif model is not None:
        keys.check(None, {}, path)


def fewshot_text(p: Params, agent: AgentParams, task) -> str | None:
    """The few-shot prompt of `agent` when it is not the kit's own: agent.exemplars=fireact gives
    ReAct on a qa task FireAct's HotpotQA trajectories; other methods and kinds keep the kit's."""
    from .data import fireact_exemplars
    from .tasks import fewshot_prompt

    if not fireact_prompt(agent, task):
        return None
    return fewshot_prompt("qa", "react", exemplars=fireact_exemplars(agent.n_exemplars, p.data_dir))


def fireact_prompt(agent: AgentParams, task) -> bool:
    """Whether `agent` prompts with FireAct's trajectories (`fewshot_text`), which are data."""
    return agent.mode == "fewshot" and agent.exemplars != "kit" and agent.method in ("react", "reflexion") \
        and task.kind == "qa"


def agent_model(p: Params, trained: str | Path | None = None) -> ModelParams:
    """The base model (trained=None) or the fine-tuned one (its adapter on the base, or its dir)."""
    from .train import adapter_model_params

    return adapter_model_params(p.model, trained) if trained else p.model


def local_llm(p: Params, trained: str | Path | None = None):
    """`agent_model` on the local backend (which carries it as `model_params`, so each condition
    records and checks the model it ran: `llm_model`); under `keys.saved_only`, no model at all."""
    from .llm import local_backend

    if keys.is_saved_only():
        return SavedOnly()
    return local_backend(agent_model(p, trained), p.agent.batch_size)


class SavedOnly:
    """The backend of a merge (`keys.saved_only`): no model. Its conditions must all be saved
    (`run_condition` checks before any episode); their keys' models are not compared, since the
    weights that made them are on other machines."""

    name = "saved-only"
    saved_only = True
    chat = False  # read when the agent is built, never used: no episode is run

    def generate(self, *args, **kwargs):
        raise RuntimeError("no model under keys.saved_only: every episode must be saved")


def finetuned_agent(p: Params) -> AgentParams:
    return p.agent.model_copy(update={"method": "react", "mode": "finetuned", "format": p.train.format})


def fewshot_react(p: Params) -> AgentParams:
    return p.agent.model_copy(update={"method": "react", "mode": "fewshot"})


def searching_react(p: Params) -> AgentParams:
    """Few-shot ReAct with evaluate.searching_baseline's overrides: the baseline that must search."""
    return fewshot_react(override(p, p.evaluate.searching_baseline, "evaluate.searching_baseline"))


SEARCHING = "base_fewshot_searching_react"  # the few-shot ReAct baseline of evaluate.searching_baseline


def baselines(p: Params, progress: bool = True) -> dict[str, list[dict]]:
    """Few-shot baselines of the base model: evaluate.methods, and evaluate.searching_baseline's
    ReAct prompt, which must search."""
    conds: dict[str, list[dict]] = {}
    base = local_llm(p)
    for m in p.evaluate.methods:
        ap = p.agent.model_copy(update={"method": m, "mode": "fewshot"})
        conds[f"base_fewshot_{m}"] = run_condition(p, f"base_fewshot_{m}", base, ap, progress=progress)
    if p.evaluate.searching_baseline:
        conds[SEARCHING] = run_condition(p, SEARCHING, base, searching_react(p), progress=progress)
    return conds


def evaluate(p: Params, trained: str | Path, progress: bool = True) -> dict[str, list[dict]]:
    """`baselines` and the fine-tuned agent on the same questions; its EM goes on its model card."""
    from .train import record_results

    conds = baselines(p, progress)
    ft = local_llm(p, trained)
    conds["finetuned_react"] = run_condition(p, "finetuned_react", ft, finetuned_agent(p), progress=progress)
    record_results(trained, "finetuned_react", f"{p.evaluate.task} {p.evaluate.split}", conds["finetuned_react"])
    save_provenance(p, "evaluate")
    return conds
