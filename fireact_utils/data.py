"""Fine-tuning datasets: FireAct's released trajectories, our generated ones, and mixtures.

Every source becomes the same trajectory record (see `trajectories`): question, steps,
preamble, task, method, reward. Mixing by task × method, deduplication by question and the
data-scaling subsets are pure, seeded functions of those records; a dataset card (counts and
token lengths) is written next to every dataset.

    recs = load_dataset_source("fireact:hotpotqa")          # 500 GPT-4 ReAct trajectories
    recs = mix(recs, {"hotpotqa:react": 300, "strategyqa:cot": 0.5}, seed=0)
"""

from __future__ import annotations

import random
import statistics
from collections import Counter
from pathlib import Path

from .config import data_dir as resolve_data_dir
from .config import data_file
from .io import DataFileError, atomic_write_json, read_json, read_jsonl, write_jsonl
from .trajectories import final_reward, parse_chat, parse_react_text, react_text, to_alpaca, to_chat

FIREACT_SETS = ("hotpotqa", "hotpotqa_multimethod", "multitask", "multitask_multimethod")


def _strategyqa_questions(root: Path) -> set[str]:
    qs: set[str] = set()
    for name in ("strategyqa_train_filtered.json", "strategyqa_dev.json"):
        qs.update(r["question"].strip() for r in read_json(data_file(root, f"strategyqa/{name}")))
    return qs


def _label(rec: dict, strategyqa_qs: set[str]) -> dict:
    """FireAct's files carry no task/method columns; infer them from content."""
    if rec.get("preamble", "").lstrip().startswith("A.") or rec["question"].startswith("Question:"):
        task = "mmlu"
    elif rec["question"].strip() in strategyqa_qs:
        task = "strategyqa"
    else:
        task = "hotpotqa"
    method = "react" if any(s["action"] == "search" for s in rec["steps"]) else "cot"
    return {**rec, "task": task, "method": method}


def load_fireact(name: str = "hotpotqa", fmt: str = "alpaca", data_dir: str | Path | None = None,
                 keep_failed: bool = False) -> list[dict]:
    """FireAct's released GPT-4 trajectories as records (reward-False rows dropped unless asked)."""
    if name not in FIREACT_SETS:
        raise ValueError(f"unknown FireAct dataset {name!r}; choose from {FIREACT_SETS}")
    root = resolve_data_dir(data_dir)
    recs = []
    if fmt == "alpaca":
        path = data_file(root, f"finetune/alpaca_format/{name}.json")
        for i, row in enumerate(read_json(path)):
            if not isinstance(row, dict) or "instruction" not in row or "output" not in row:
                raise DataFileError(f"{path}: record {i} lacks instruction/output")
            preamble, steps = parse_react_text(row["output"])
            recs.append({"question": row["instruction"], "preamble": preamble, "steps": steps,
                         "eol": row["output"].endswith("\n")})
    elif fmt == "chat":
        path = data_file(root, f"finetune/gpt_format/{name}.jsonl")
        for i, row in enumerate(read_jsonl(path)):
            if "messages" not in row:
                raise DataFileError(f"{path}: record {i + 1} lacks messages")
            q, steps = parse_chat(row["messages"])
            recs.append({"question": q, "preamble": "", "steps": steps})
    else:
        raise ValueError(f"format must be alpaca or chat, not {fmt!r}")
    sq = _strategyqa_questions(root)
    out = []
    for i, r in enumerate(recs):
        r = _label(r, sq)
        r.update(source=f"fireact:{name}", source_index=i, reward=final_reward(r["steps"]))
        if keep_failed or r["reward"] is not False:
            out.append(r)
    return out


# Where FireAct's released trajectories searched: GPT-4 with live Google through SerpAPI (2023).
FIREACT_ENVIRONMENT = {"search": "serpapi", "corpus": "live Google (SerpAPI, 2023), as recorded by FireAct",
                       "retriever": "Google answer box, else first snippet", "k": 1, "max_obs_chars": None,
                       "noise": "none"}


def fireact_exemplars(n: int, data_dir: str | Path | None = None) -> str:
    """`n` of FireAct's GPT-4 HotpotQA ReAct trajectories as few-shot text: the shortest successful
    ones with two or more searches (multi-hop, and the prompt stays short). FireAct's training
    questions, so never an evaluation question."""
    recs = [r for r in load_fireact("hotpotqa", data_dir=data_dir)
            if r["steps"] and r["steps"][-1]["action"] == "finish" and sum(s["action"] == "search" for s in r["steps"]) >= 2]
    recs.sort(key=lambda r: (len(react_text(r["steps"])), r["source_index"]))
    # The last step's "Episode finished, reward = True" observation is the environment's, not an exemplar's.
    shots = [f"Question: {r['question']}\n" + react_text([*r["steps"][:-1], {**r["steps"][-1], "observation": None}])
             for r in recs[:n]]
    return "\n".join(shots)


def load_dataset_source(source: str, data_dir: str | Path | None = None, fmt: str = "alpaca") -> list[dict]:
    """`fireact:<name>` or a JSONL of trajectory records (as written by generation)."""
    if source.startswith("fireact:"):
        return load_fireact(source.split(":", 1)[1], fmt=fmt, data_dir=data_dir)
    recs = read_jsonl(source)
    for i, r in enumerate(recs):
        if "question" not in r or "steps" not in r:
            raise DataFileError(f"{source}: line {i + 1} is not a trajectory record (needs question, steps)")
    return [r for r in recs if kept_by_reward(r)]


# ---------------------------------------------------------------- the reward filter, explained

def kept_by_reward(rec: dict) -> bool:
    """The filter between the teacher and the dataset: only reward-true episodes train the student."""
    return bool(rec.get("reward", rec.get("em")))


def filter_outcome(rec: dict) -> tuple[str, str]:
    """(outcome, one-line reason) of the reward filter on one episode record. Outcome is `kept`,
    `wrong answer` (finished, but not the gold answer) or the exit status of an episode that never
    finished (`max_turns`, `parse_error`, `tool_error`, `api_error`)."""
    steps = rec.get("steps", [])
    answer = rec.get("answer", steps[-1]["arg"] if steps and steps[-1]["action"] == "finish" else None)
    gold = rec.get("gold")
    vs_gold = f"{answer!r} vs gold {gold!r}" if gold is not None else repr(answer)
    if kept_by_reward(rec):
        return "kept", f"correct: {vs_gold}"
    status = rec.get("status") or ("finished" if answer is not None else "unfinished")  # released rows: no status
    errors = rec.get("errors") or []
    last = f", last: {errors[-1][:80]!r}" if errors else ""
    if status == "finished":
        f1 = f" (F1 {rec['f1']:.2f})" if "f1" in rec else ""
        return "wrong answer", f"finished with a wrong answer: {vs_gold}{f1}"
    if status in ("max_turns", "unfinished"):
        cut = " (agent.max_turns)" if status == "max_turns" else ""
        return status, f"never finished: no finish[...] in {len(steps)} turns{cut}{last}"
    if status == "parse_error":
        return status, f"never finished: invalid actions in a row, the model lost the format{last}"
    return status, f"never finished: {status.replace('_', ' ')}{last}"


def generated_episodes(gen_dir: str | Path) -> list[dict]:
    """Every teacher episode saved under `gen_dir` (a run's `generate/`), kept or not, by file and
    question index (episodes are saved as they end); a re-run episode (api_error) counts once, as its
    newest record."""
    out: list[dict] = []
    for f in sorted(Path(gen_dir).glob("*.jsonl")):
        by_id = {r.get("id", str(i)): r for i, r in enumerate(read_jsonl(f))}
        out += sorted(by_id.values(), key=lambda r: r.get("idx", 0))
    return out


def episode_table(records: list[dict]):
    """One row per episode: which the reward filter kept, and why each other one was dropped."""
    import pandas as pd

    rows = []
    for r in records:
        outcome, reason = filter_outcome(r)
        q = r["question"]
        rows.append({"id": r.get("id", ""), "question": q if len(q) <= 60 else q[:57] + "...",
                     "turns": len(r.get("steps", [])), "status": r.get("status"), "outcome": outcome, "reason": reason})
    return pd.DataFrame(rows, columns=["id", "question", "turns", "status", "outcome", "reason"])


def rejected_example(records: list[dict]) -> dict | None:
    """The dropped episode worth reading first: one that finished with a wrong answer (a well-formed
    trajectory the filter still catches), else the first dropped one; None if nothing was dropped."""
    dropped = [r for r in records if not kept_by_reward(r)]
    finished = [r for r in dropped if filter_outcome(r)[0] == "wrong answer"]
    return (finished or dropped or [None])[0]


def annotated_episode(rec: dict | None) -> str:
    """A dropped episode as text to print: question, gold, its ReAct scratchpad, and why the
    reward filter left it out of the fine-tuning data."""
    if rec is None:
        return "No episode was dropped: every teacher episode earned reward 1."
    outcome, reason = filter_outcome(rec)
    head = f"Question: {rec['question']}\nGold answer: {rec.get('gold', '?')}\n\n"
    errors = "".join(f"\n  - step error: {e}" for e in rec.get("errors") or [])
    return (head + react_text(rec.get("steps", []), rec.get("preamble", ""))
            + f"\n=> {outcome.upper()}: {reason}{errors}\n=> dropped by the reward filter: not in the fine-tuning data")


def dedup(records: list[dict]) -> list[dict]:
    """First record per question (normalized whitespace/case)."""
    seen: set[str] = set()
    out = []
    for r in records:
        k = " ".join(r["question"].lower().split())
        if k not in seen:
            seen.add(k)
            out.append(r)
    return out


def mix(records: list[dict], mixture: dict[str, float] | None = None, n: int | None = None, seed: int = 0,
        tasks: list[str] | None = None) -> list[dict]:
    """Keep `tasks` (all if empty), select by `task:method` (count if >= 1, else fraction of that
    group), dedup, seeded shuffle, then keep the first `n` (data-scaling subsets are nested: first
    100 ⊂ first 200 …)."""
    records = dedup(records)
    if tasks:
        have = sorted({str(r.get("task")) for r in records})
        records = [r for r in records if r.get("task") in tasks]
        if not records:
            raise ValueError(f"dataset.tasks {tasks} matches no trajectories; have tasks: {', '.join(have)}")
    if mixture:
        groups: dict[str, list[dict]] = {}
        for r in records:
            groups.setdefault(f"{r.get('task', '?')}:{r.get('method', '?')}", []).append(r)
        chosen = []
        for key, w in mixture.items():
            if key not in groups:  # a misspelled key would otherwise select nothing (ratio) or fail late
                raise ValueError(f"mixture key {key!r} matches no trajectories; have: {', '.join(sorted(groups))}")
            g = groups[key]
            k = int(w) if w >= 1 else round(w * len(g))
            if k > len(g):
                raise ValueError(f"mixture asks {k} of {key} but only {len(g)} exist (have: {sorted(groups)})")
            chosen += random.Random(f"{seed}:{key}").sample(g, k)
        records = chosen
    records = list(records)
    random.Random(seed).shuffle(records)
    if n is not None:
        if n > len(records):
            raise ValueError(f"asked for {n} trajectories, only {len(records)} available")
        records = records[:n]
    return records


def dataset_card(records: list[dict], tok=None, environments: dict[str, dict] | None = None) -> dict:
    """Counts per task/method, token-length statistics (characters if no tokenizer), and the
    environment card (search kind, corpus, retriever, k, observation length, noise) of each source."""
    texts = [to_alpaca(r)["output"] for r in records]
    lens = [len(tok(t)["input_ids"]) for t in texts] if tok is not None else [len(t) for t in texts]
    unit = "tokens" if tok is not None else "chars"
    return {
        "n": len(records),
        "by_task_method": dict(Counter(f"{r.get('task', '?')}:{r.get('method', '?')}" for r in records)),
        "turns_mean": statistics.fmean(len(r["steps"]) for r in records) if records else 0,
        f"length_{unit}": {"mean": statistics.fmean(lens) if lens else 0, "max": max(lens, default=0),
                           "total": sum(lens)},
        "environments": environments or {},
    }


def save_dataset(records: list[dict], out_dir: str | Path, tok=None, environments: dict[str, dict] | None = None) -> Path:
    """Write records + both FireAct formats + the dataset card into `out_dir`; the two formats also
    as a Hugging Face `DatasetDict` (splits `alpaca`, `chat`) in `out_dir/hf`, for
    `datasets.load_from_disk`."""
    from datasets import Dataset, DatasetDict

    out = Path(out_dir)
    alpaca, chat = [to_alpaca(r) for r in records], [to_chat(r) for r in records]
    write_jsonl(out / "trajectories.jsonl", records)
    atomic_write_json(out / "alpaca.json", alpaca)
    write_jsonl(out / "chat.jsonl", chat)
    DatasetDict({"alpaca": Dataset.from_list(alpaca), "chat": Dataset.from_list(chat)}).save_to_disk(str(out / "hf"))
    atomic_write_json(out / "card.json", dataset_card(records, tok, environments))
    return out
