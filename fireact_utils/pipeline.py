"""The study's stages, shared by the notebooks and the CLI, plus the papermill chain.

Each stage reads resolved `Params`, writes its artifacts under `params.run_dir` and skips
work already saved there, so any stage (and the whole chain) can be killed and re-run.

    run_dir/
      params.json               resolved params + versions (written by every stage)
      generate/<task>_<method>.jsonl   teacher episodes (all, successes flagged by reward)
      dataset/                  trajectories.jsonl, alpaca.json, chat.jsonl, card.json
      finetune/final/           fine-tuned model or adapter, train_log.csv, train_done.json
      eval/<condition>.jsonl    one record per episode; <condition>.meta.json: wall time, tool stats
      tables/, figures/, notebooks/
"""

from __future__ import annotations

import platform
import random
import time
from pathlib import Path

from .agent import run_episodes, summarize
from .config import AgentParams, Params, SearchParams, load_params
from .io import atomic_write_json, read_json
from .tasks import eval_indices, load_task

NOTEBOOKS = ("00_walkthrough", "01_generate_trajectories", "02_finetune", "03_evaluate", "04_scaling_and_robustness")
NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"


def provenance(p: Params) -> dict:
    import torch
    import transformers

    from . import __version__

    return {"params": p.dump(), "fireact_utils": __version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "time": time.strftime("%Y-%m-%d %H:%M:%S")}


def save_provenance(p: Params, stage: str) -> None:
    atomic_write_json(p.run_dir / "provenance" / f"{stage}.json", provenance(p))


# ---------------------------------------------------------------- generation + dataset

def generation_indices(task, n: int, seed: int, eval_split: str, eval_n: int) -> list[int]:
    """Training questions: a seeded sample that never overlaps the evaluation subset."""
    held_out = set(eval_indices(task, eval_n)) if task.split == eval_split else set()
    pool = [i for i in range(len(task)) if i not in held_out]
    return sorted(random.Random(seed).sample(pool, min(n, len(pool))))


def generate(p: Params, progress: bool = True) -> dict:
    """Run the teacher on training questions; return per task/method yield, turns and cost."""
    from .llm import make_llm
    from .tools import make_search

    g = p.generate
    out: dict = {}
    if g.n_questions == 0:
        return out
    teacher = make_llm(g.teacher, p.model, p.agent.batch_size)
    search = make_search(p.search, p.data_dir)
    for task_name in g.tasks:
        task = load_task(task_name, g.split, p.data_dir)
        idx = generation_indices(task, g.n_questions, g.seed, p.evaluate.split, 500)
        for method in g.methods:
            ap = p.agent.model_copy(update={"method": method, "mode": "fewshot"})
            recs = run_episodes(task, idx, teacher, search, ap, p.run_dir / "generate" / f"{task_name}_{method}.jsonl",
                                progress=progress)
            s = summarize(recs)
            cost = (s["prompt_tokens"] * g.teacher.price_per_1k_prompt
                    + s["completion_tokens"] * g.teacher.price_per_1k_completion) / 1000 * s["n"]
            out[f"{task_name}:{method}"] = {"n": s["n"], "successes": sum(r["reward"] for r in recs),
                                            "yield": s["em"], "turns": s["turns"], "cost_usd": cost,
                                            "prompt_tokens": s["prompt_tokens"], "completion_tokens": s["completion_tokens"]}
    atomic_write_json(p.run_dir / "generate" / "summary.json", out)
    return out


def build_dataset(p: Params, tok=None) -> list[dict]:
    """Released and/or generated successes, mixed per `p.dataset`, saved with its card."""
    from .data import load_dataset_source, mix, save_dataset

    recs = load_dataset_source(p.dataset.source, p.data_dir, fmt=p.train.format) if p.dataset.source else []
    for f in sorted((p.run_dir / "generate").glob("*.jsonl")):
        recs += load_dataset_source(str(f))
    if not recs:
        raise ValueError("no training trajectories: set dataset.source or generate.n_questions > 0")
    recs = mix(recs, p.dataset.mixture or None, p.dataset.n_trajectories, p.dataset.seed)
    save_dataset(recs, p.run_dir / "dataset", tok)
    save_provenance(p, "dataset")
    return recs


# ---------------------------------------------------------------- fine-tuning

def finetune(p: Params, records: list[dict] | None = None, out: str | Path | None = None) -> Path:
    from .data import load_dataset_source
    from .train import finetune as sft

    if records is None:
        ds = p.run_dir / "dataset" / "trajectories.jsonl"
        records = load_dataset_source(str(ds)) if ds.is_file() else build_dataset(p)
    save_provenance(p, "finetune")
    return sft(records, out or p.run_dir / "finetune", p.train, p.model)


# ---------------------------------------------------------------- evaluation

def run_condition(p: Params, name: str, llm, agent: AgentParams, search: SearchParams | None = None,
                  task: str | None = None, n: int | None = None, progress: bool = True) -> list[dict]:
    """Evaluate one condition on the first n questions of the seeded shuffle; resumable by name.

    Wall time and tool statistics accumulate in `<name>.meta.json` over resumed runs.
    """
    from .tools import make_search

    t = load_task(task or p.evaluate.task, None if task else p.evaluate.split, p.data_dir)
    idx = eval_indices(t, n or p.evaluate.n_questions, p.evaluate.seed)
    tool = make_search(search or p.search, p.data_dir) if agent.method in ("react", "reflexion") else None
    path = p.run_dir / "eval" / f"{name}.jsonl"
    meta_path = path.with_suffix(".meta.json")
    meta = read_json(meta_path) if meta_path.is_file() else {"wall_s": 0.0, "episodes_run": 0}
    before = _count_lines(path)
    t0 = time.time()
    recs = run_episodes(t, idx, llm, tool, agent, path, progress=progress)
    ran = _count_lines(path) - before
    if ran:
        meta["wall_s"] += time.time() - t0
        meta["episodes_run"] += ran
        if tool is not None:
            meta["tool"] = tool.stats()
        meta.update(condition=name, model=llm.name, agent=agent.model_dump(), task=t.name, split=t.split)
        atomic_write_json(meta_path, meta)
    return recs


def _count_lines(path: Path) -> int:
    return sum(1 for _ in open(path)) if path.is_file() else 0


def condition_meta(p: Params, name: str) -> dict:
    f = p.run_dir / "eval" / f"{name}.meta.json"
    return read_json(f) if f.is_file() else {}


def local_llm(p: Params, trained: str | Path | None = None):
    """The base model (trained=None) or the fine-tuned one, on the local backend."""
    from .llm import LocalBackend
    from .train import adapter_model_params

    mp = adapter_model_params(p.model, trained) if trained else p.model
    return LocalBackend(mp, batch_size=p.agent.batch_size)


def finetuned_agent(p: Params) -> AgentParams:
    return p.agent.model_copy(update={"method": "react", "mode": "finetuned", "format": p.train.format})


def evaluate(p: Params, trained: str | Path, progress: bool = True) -> dict[str, list[dict]]:
    """Few-shot baselines of the base model and the fine-tuned agent, on the same questions."""
    conds: dict[str, list[dict]] = {}
    base = local_llm(p)
    for m in p.evaluate.methods:
        ap = p.agent.model_copy(update={"method": m, "mode": "fewshot"})
        conds[f"base_fewshot_{m}"] = run_condition(p, f"base_fewshot_{m}", base, ap, progress=progress)
    del base
    ft = local_llm(p, trained)
    conds["finetuned_react"] = run_condition(p, "finetuned_react", ft, finetuned_agent(p), progress=progress)
    save_provenance(p, "evaluate")
    return conds


def condition_label(name: str) -> str:
    labels = {"base_fewshot_io": "base few-shot IO", "base_fewshot_cot": "base few-shot CoT",
              "base_fewshot_react": "base few-shot ReAct", "finetuned_react": "FireAct fine-tuned ReAct"}
    return labels.get(name, name.replace("_", " "))


def table_extras(p: Params, names) -> dict[str, dict]:
    """Columns beside each condition: seconds/episode and the replayed-search hit rates."""
    out = {}
    for n in names:
        m = condition_meta(p, n)
        row = {}
        if m.get("episodes_run"):
            row["seconds_per_episode"] = m["wall_s"] / m["episodes_run"]
        tool = m.get("tool") or {}
        if "hit_rate" in tool:
            row["search_exact_hit_rate"] = tool["hit_rate"]
            row["search_bm25_rate"] = tool.get("bm25_rate")
        if "noise_rate" in tool:
            row["noise_rate"] = tool["noise_rate"]
            row["noise_kind"] = tool.get("noise_kind")
        agent = m.get("agent") or {}
        if agent:  # lets plots tell prompted from fine-tuned agents without parsing names
            row["mode"], row["method"] = agent.get("mode"), agent.get("method")
        out[condition_label(n)] = row
    return out


def condition_table(p: Params, conds: dict[str, list[dict]]):
    """`evaluate.results_table` of conditions keyed by run name: labelled rows, CIs with
    `evaluate.bootstrap` resamples, and the `table_extras` columns."""
    from .evaluate import results_table

    labelled = {condition_label(k): v for k, v in conds.items()}
    return results_table(labelled, p.evaluate.bootstrap, extra=table_extras(p, conds))


# ---------------------------------------------------------------- study (notebook 04)

def noise_conditions(p: Params, trained: str | Path, progress: bool = True) -> dict[str, list[dict]]:
    """The fine-tuned agent (and, if asked, the few-shot base) with a noisy search tool."""
    conds: dict[str, list[dict]] = {}
    runs = [("finetuned", trained, finetuned_agent(p))]
    if p.study.noisy_fewshot:
        runs.append(("base_fewshot", None, p.agent.model_copy(update={"method": "react", "mode": "fewshot"})))
    for label, model, ap in runs:
        llm = local_llm(p, model)
        for kind in p.study.noise_kinds:
            for rate in p.study.noise_rates:
                sp = p.search.model_copy(update={"noise_rate": rate, "noise_kind": kind})
                name = f"{label}_react_noise_{kind}_{rate:g}"
                conds[name] = run_condition(p, name, llm, ap, sp, progress=progress)
    return conds


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
    source = load_dataset_source(p.dataset.source, p.data_dir, p.train.format)
    runs = {}
    for n in p.study.data_sizes:
        q = p.model_copy(update={"dataset": p.dataset.model_copy(update={"n_trajectories": n})})
        recs = mix(source, q.dataset.mixture or None, n, q.dataset.seed)
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


def generalization(p: Params, trained: str | Path, progress: bool = True) -> dict[str, dict[str, list[dict]]]:
    """Base few-shot ReAct vs fine-tuned on other tasks (study.generalization_tasks)."""
    out: dict[str, dict[str, list[dict]]] = {}
    ap = p.agent.model_copy(update={"method": "react", "mode": "fewshot"})
    for task in p.study.generalization_tasks:
        slug = task.replace(":", "_").replace("/", "_")
        out[task] = {
            "base few-shot ReAct": run_condition(p, f"gen_{slug}_base", local_llm(p), ap, task=task, progress=progress),
            "FireAct fine-tuned": run_condition(p, f"gen_{slug}_ft", local_llm(p, trained), finetuned_agent(p),
                                                task=task, progress=progress),
        }
    return out


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
                            kernel_name="python3", progress_bar=False)
        if html:
            export_html(out)
        atomic_write_json(done, {"seconds": time.time() - t0})
        print(f"[done] {nb} in {time.time() - t0:.0f}s")
    return p.run_dir


def export_html(ipynb: Path) -> Path:
    import nbformat
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter().from_notebook_node(nbformat.read(str(ipynb), as_version=4))
    out = ipynb.with_suffix(".html")
    out.write_text(body, encoding="utf-8")
    return out
