"""Tasks: the questions an agent answers, their gold answers, and how an answer is scored.

    from fireact_utils.tasks import load_task, eval_indices, fewshot_prompt
    task = load_task("hotpotqa")                  # dev split, 7,405 questions
    wiki = load_task("hotpotqa-wiki", "val")      # 200 questions, searched in real Wikipedia paragraphs
    idx = eval_indices(task, 500)                 # FireAct's dev-500 subset (seed 233)
    task.evaluate(idx[0], "Seth MacFarlane")      # {'em': True, 'f1': 1.0, 'pred': ..., 'gt': ...}
    prompt = fewshot_prompt(task.kind, "react") + f"Question: {task.questions[idx[0]]}\n"

Scoring follows the paper: HotpotQA's EM/F1 on SQuAD-normalized strings for open questions;
StrategyQA counts an answer by its leading yes/no; MMLU by its leading option letter. Tasks are
one of three kinds ("qa", "yesno", "mc"), which pick both the scorer and the few-shot prompts.
"""

from __future__ import annotations

import random
import re
import string
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from fireact_utils.config import EvalParams, data_file, default
from fireact_utils.config import data_dir as resolve_data_dir
from fireact_utils.io import DataFileError, iter_jsonl, read_csv_rows, read_json

KINDS = ("qa", "yesno", "mc")
METHODS = ("io", "cot", "react")
PROMPT_DIR = Path(__file__).resolve().parent / "prompts"
MC_LETTERS = "ABCD"

# ----------------------------------------------------------------------------
# metrics (the HotpotQA evaluation script's rules, reimplemented)

_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(s: str) -> str:
    """SQuAD normalization: lowercase, drop ASCII punctuation and the articles a/an/the, squeeze spaces."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", s).split())


def exact_match(pred: str, gold: str) -> bool:
    return normalize_answer(pred) == normalize_answer(gold)


def f1_score(pred: str, gold: str) -> float:
    """Token-level F1 of the normalized strings.

    HotpotQA's rule: a yes/no/noanswer on either side earns no partial credit, so "no" vs
    "no idea" scores 0, not 0.67. Two empty strings also score 0 (no common token), as upstream.
    """
    p, g = normalize_answer(pred), normalize_answer(gold)
    special = ("yes", "no", "noanswer")
    if (p in special or g in special) and p != g:
        return 0.0
    p_toks, g_toks = p.split(), g.split()
    common = sum((Counter(p_toks) & Counter(g_toks)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p_toks), common / len(g_toks)
    return 2 * precision * recall / (precision + recall)


def yes_no(answer: str) -> str:
    """'yes' or 'no' when the normalized answer starts with it ("Yes, because..."), else the normalized answer."""
    norm = normalize_answer(answer)
    first = norm.split(" ", 1)[0]
    return first if first in ("yes", "no") else norm


# An option letter at the start: "B", "(B)", "B. sight", "b)", "Answer: C". A lowercase letter must
# stand alone or be closed by . ) : so that "a dog" is read as words, not as option A.
_CHOICE = re.compile(
    r"^\s*(?i:(?:the\s+)?(?:answer|option)(?:\s+is)?\s*:?\s*)?"
    r"(?:\(\s*([A-Da-d])\s*\)|([A-D])(?![A-Za-z0-9])|([a-d])(?=$|[.):]))"
)


def choice_letter(answer: str) -> str | None:
    """The leading option letter of a multiple-choice answer, uppercased, or None."""
    m = _CHOICE.match(answer)
    return next(g for g in m.groups() if g).upper() if m else None


# ----------------------------------------------------------------------------
# the task


@dataclass
class Task:
    """Questions with gold answers; index i is the example's id everywhere (episodes, logs)."""

    name: str  # "hotpotqa", "mmlu:anatomy", or the path of a custom file
    split: str
    kind: str  # "qa" | "yesno" | "mc": picks the scorer and the few-shot prompts
    questions: list[str]  # as shown to the agent (mc: with "A. ..." option lines)
    answers: list[str]  # gold as strings: free text, "yes"/"no", or a letter; "" when unlabeled
    labeled: bool = True  # False for test splits published without answers
    corpus: str | None = None  # a wiki task's own search corpus, by name (its environment comes with it)
    gold_titles: list[list[str]] | None = None  # wiki tasks: titles of each question's gold paragraphs

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown task kind {self.kind!r}; valid: {', '.join(KINDS)}")
        if len(self.questions) != len(self.answers):
            raise ValueError(f"{self.name}: {len(self.questions)} questions but {len(self.answers)} answers")

    def __len__(self) -> int:
        return len(self.questions)

    def evaluate(self, idx: int, answer: str | None) -> dict[str, Any]:
        """Score `answer` (None: the agent never finished) against example `idx`.

        Returns em (bool), f1 (float), and the normalized pred and gt that were compared.
        """
        if not self.labeled:
            raise ValueError(f"{self.name} split {self.split!r} has no gold answers; evaluate on a labeled split")
        answer = answer or ""
        gold = self.answers[idx]
        if self.kind == "qa":
            pred, gt = normalize_answer(answer), normalize_answer(gold)
            return {"em": pred == gt, "f1": f1_score(answer, gold), "pred": pred, "gt": gt}
        if self.kind == "yesno":
            pred, gt = yes_no(answer), gold
        else:
            pred, gt = choice_letter(answer) or normalize_answer(answer), gold
        em = pred == gt
        return {"em": em, "f1": float(em), "pred": pred, "gt": gt}


# ----------------------------------------------------------------------------
# loading


class _Spec(NamedTuple):
    kind: str
    default_split: str
    files: dict[str, str]  # split -> path under the data dir (mmlu: a folder of per-subject CSVs)
    unlabeled: tuple[str, ...] = ()  # splits published without answers


TASKS = {
    "hotpotqa": _Spec("qa", "dev", {"dev": "hotpotqa/dev.json", "test": "hotpotqa/test.json"}, ("test",)),
    "bamboogle": _Spec("qa", "test", {"test": "bamboogle/test.csv"}),
    "strategyqa": _Spec(
        "yesno",
        "dev",
        {
            "dev": "strategyqa/strategyqa_dev.json",
            "test": "strategyqa/strategyqa_test.json",
            "train": "strategyqa/strategyqa_train_filtered.json",
        },
        ("test",),
    ),
    "mmlu": _Spec("mc", "test", {"dev": "mmlu/dev", "val": "mmlu/val", "test": "mmlu/test"}),
}
# Wiki tasks: the multihop data's questions, searched in their own Wikipedia corpus (`wiki`).
# name -> (folder of the multihop data, kind, default split)
WIKI_TASKS = {
    "hotpotqa-wiki": ("hotpotqa", "qa", "test"),
    "2wikimultihopqa": ("2wikimultihopqa", "qa", "dev"),
    "strategyqa-wiki": ("strategyqa", "yesno", "dev"),
}
# HotpotQA-wiki's 793 questions, split once with a fixed seed: `test` holds the 58 that are in
# FireAct's dev-500 plus 242 others (300), `val` 200 of the rest, `train` the remaining 293.
# Recipe choices are made on `val`, never on `test`.
WIKI_SPLIT_SEED = 0
WIKI_SPLIT_SIZES = {"val": 200, "test": 300}
CHOICES_HELP = ", ".join([*TASKS, *WIKI_TASKS]) + ", mmlu:<subject>, or a path ending .json/.jsonl"
# Questions in each split of the data `download` fetches (a test holds them equal to it): a condition's
# questions are a seeded shuffle of them (`eval_indices`), rebuilt from its saved episodes alone by
# `saved_task` where its meta predates `task_size`.
SPLIT_SIZES = {
    "hotpotqa": {"dev": 7405, "test": 7405}, "bamboogle": {"test": 125},
    "strategyqa": {"dev": 229, "test": 490, "train": 2821}, "mmlu": {"dev": 285, "val": 1531, "test": 14042},
    "hotpotqa-wiki": {"train": 293, "val": 200, "test": 300}, "2wikimultihopqa": {"dev": 164},
    "strategyqa-wiki": {"dev": 229},
}


def _gold(value: Any, kind: str, where: str) -> str:
    """A record's answer as a gold string; booleans become yes/no."""
    if kind == "yesno" and isinstance(value, bool):
        return "yes" if value else "no"
    if kind == "qa" and isinstance(value, str | int | float) and not isinstance(value, bool):
        return str(value)
    raise DataFileError(f"{where}: answer {value!r} is not a {'boolean' if kind == 'yesno' else 'string'}")


def _qa_records(records: list[Any], kind: str, labeled: bool, where: list[str]) -> tuple[list[str], list[str]]:
    """Questions and gold answers of dict records; `where[i]` names record i in error messages."""
    questions, answers = [], []
    for rec, loc in zip(records, where, strict=True):
        if not isinstance(rec, dict) or not isinstance(rec.get("question"), str):
            raise DataFileError(f"{loc}: record has no string 'question' field")
        if labeled and "answer" not in rec:
            raise DataFileError(f"{loc}: record has no 'answer' field")
        questions.append(rec["question"])
        answers.append(_gold(rec["answer"], kind, loc) if labeled else "")
    return questions, answers


def _json_list(path: Path) -> list[Any]:
    records = read_json(path)
    if not isinstance(records, list):
        raise DataFileError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
    return records


def mmlu_subjects(split: str = "test", data_dir: str | Path | None = None) -> list[str]:
    """The MMLU subjects present for `split`, sorted (57 in FireAct's copy)."""
    folder = data_file(resolve_data_dir(data_dir), TASKS["mmlu"].files[split])
    suffix = f"_{split}.csv"
    return sorted(p.name[: -len(suffix)] for p in folder.glob(f"*{suffix}"))


def _load_mmlu(subjects: list[str], split: str, folder: Path) -> tuple[list[str], list[str]]:
    questions, answers = [], []
    for subject in subjects:
        path = folder / f"{subject}_{split}.csv"
        for line, (q, *options, letter) in enumerate(read_csv_rows(path, n_cols=6), 1):
            if letter.strip() not in MC_LETTERS:
                raise DataFileError(f"{path} row {line}: answer {letter!r} is not one of {', '.join(MC_LETTERS)}")
            lines = [f"{lab}. {opt}" for lab, opt in zip(MC_LETTERS, options, strict=True)]
            questions.append("\n".join([q, *lines]))
            answers.append(letter.strip())
    return questions, answers


def _load_custom(path: Path, split: str | None) -> Task:
    """A .json list or .jsonl of {question, answer}; all-boolean answers make it a yes/no task."""
    if path.suffix == ".jsonl":
        if not path.is_file():
            raise DataFileError(f"file not found: {path}")
        records = list(iter_jsonl(path))
        # iter_jsonl skips blank lines, so map record i back to its line for error messages
        lines = [i for i, text in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if text.strip()]
        where = [f"{path} line {n}" for n in lines[: len(records)]]
    else:
        records = _json_list(path)
        where = [f"{path} record {i}" for i in range(len(records))]
    answers = [r.get("answer") for r in records if isinstance(r, dict)]
    kind = "yesno" if answers and all(isinstance(a, bool) for a in answers) else "qa"
    questions, golds = _qa_records(records, kind, True, where)
    return Task(str(path), split or "custom", kind, questions, golds)


def wiki_splits(records: list[dict]) -> dict[str, list[int]]:
    """HotpotQA-wiki's fixed, disjoint splits (record indices, file order): see WIKI_SPLIT_SIZES."""
    dev500 = [i for i, r in enumerate(records) if r.get("in_fireact_dev500")]
    free = [i for i, r in enumerate(records) if not r.get("in_fireact_dev500")]
    random.Random(WIKI_SPLIT_SEED).shuffle(free)
    n_val, n_test = WIKI_SPLIT_SIZES["val"], WIKI_SPLIT_SIZES["test"] - len(dev500)
    return {"train": sorted(free[n_val + n_test:]), "val": sorted(free[:n_val]),
            "test": sorted(dev500 + free[n_val:n_val + n_test])}


def _load_wiki(name: str, split: str | None, multihop_dir: str | Path | None) -> Task:
    from .config import multihop_dir as resolve_multihop_dir

    folder, kind, default = WIKI_TASKS[name]
    path = data_file(resolve_multihop_dir(multihop_dir), f"{folder}/questions.jsonl")
    records = list(iter_jsonl(path, tolerate_torn_tail=False))
    splits = wiki_splits(records) if name == "hotpotqa-wiki" else {default: list(range(len(records)))}
    split = split or default
    if split not in splits:
        raise ValueError(f"unknown split {split!r} for {name}; valid: {', '.join(splits)}")
    chosen = [records[i] for i in splits[split]]
    questions, answers = _qa_records(chosen, kind, True, [f"{path} record {i}" for i in splits[split]])
    return Task(name, split, kind, questions, answers, corpus=folder,
                gold_titles=[list(r.get("supporting_titles") or []) for r in chosen])


def load_task(name: str, split: str | None = None, data_dir: str | Path | None = None,
              multihop_dir: str | Path | None = None) -> Task:
    """Load a task by name (see CHOICES_HELP); `split` None takes the task's default split.

    A custom file needs no data dir; its split is only a label. `mmlu` joins all subjects, in
    sorted order; `mmlu:<subject>` loads one. Wiki tasks read the multihop data (`multihop_dir`)
    and carry their corpus and gold paragraph titles.
    """
    if name.endswith((".json", ".jsonl")):
        return _load_custom(Path(name).expanduser(), split)
    if name in WIKI_TASKS:
        return _load_wiki(name, split, multihop_dir)
    base, sep, subject = name.partition(":")
    if base not in TASKS or (sep and (base != "mmlu" or not subject)):
        raise ValueError(f"unknown task {name!r}; valid: {CHOICES_HELP}")
    spec = TASKS[base]
    split = split or spec.default_split
    if split not in spec.files:
        raise ValueError(f"unknown split {split!r} for {base}; valid: {', '.join(spec.files)}")
    root = resolve_data_dir(data_dir)
    path = data_file(root, spec.files[split])
    labeled = split not in spec.unlabeled

    if base == "mmlu":
        subjects = mmlu_subjects(split, root)
        if not subjects:
            raise DataFileError(f"no MMLU files *_{split}.csv in {path}")
        if subject and subject not in subjects:
            raise ValueError(f"unknown MMLU subject {subject!r}; valid: {', '.join(subjects)}")
        questions, answers = _load_mmlu([subject] if subject else subjects, split, path)
    elif base == "bamboogle":
        rows = read_csv_rows(path, n_cols=2)
        if not rows or [c.strip().lower() for c in rows[0]] != ["question", "answer"]:
            raise DataFileError(f"{path}: expected a header row 'Question,Answer'")
        questions, answers = [r[0] for r in rows[1:]], [r[1] for r in rows[1:]]
    else:
        records = _json_list(path)
        where = [f"{path} record {i}" for i in range(len(records))]
        questions, answers = _qa_records(records, spec.kind, labeled, where)
    return Task(name, split, spec.kind, questions, answers, labeled)


def saved_task(name: str, split: str | None, records: Iterable[dict], metas: Iterable[dict] = ()) -> Task:
    """`name`'s task as saved episode `records` show it, for a report that reads no data
    (`keys.saved_only`): each saved question and gold at its index, "" at the others. Its length
    (the seeded shuffle's) is what condition `metas` record (`task_size`), else `SPLIT_SIZES`; a
    wiki task's gold titles are what they record (`gold_titles`: episode id -> titles), else None."""
    base = name.partition(":")[0]
    corpus, kind, default = WIKI_TASKS.get(name, (None, None, "custom"))  # None, None: a question file's
    if base in TASKS:
        kind, default = TASKS[base].kind, TASKS[base].default_split
    split = split or default
    mine = {r["idx"]: r for r in records if r["id"].startswith(f"{name}/{split}/")}
    metas = [m for m in metas if (m.get("task"), m.get("split")) == (name, split)]
    size = next((m["task_size"] for m in metas if "task_size" in m), SPLIT_SIZES.get(name, {}).get(split))
    if size is None:
        raise ValueError(f"{name} {split}: no saved condition records its size (task_size) and tasks.SPLIT_SIZES "
                         "lacks it: its questions' order cannot be rebuilt from the bundles")
    questions, answers = [""] * size, [""] * size
    for i, r in mine.items():
        questions[i], answers[i] = r["question"], r["gold"]
    if kind is None:  # a question file: yes/no when every gold is (`_load_custom`)
        kind = "yesno" if mine and all(r["gold"] in ("yes", "no") for r in mine.values()) else "qa"
    gold = {i: t for m in metas for i, t in (m.get("gold_titles") or {}).items()}
    titles = [list(gold.get(f"{name}/{split}/{i}", [])) for i in range(size)] if gold else None
    return Task(name, split, kind, questions, answers, base not in TASKS or split not in TASKS[base].unlabeled,
                corpus, titles)


def eval_indices(task_or_len: Task | int, n: int, seed: int = default(EvalParams, "seed")) -> list[int]:
    """The first `n` of indices 0..N-1 shuffled by random.Random(seed); seed 233 on HotpotQA dev
    gives FireAct's 500 evaluation questions (the keys of its trajs/*.json)."""
    total = task_or_len if isinstance(task_or_len, int) else len(task_or_len)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    idx = list(range(total))
    random.Random(seed).shuffle(idx)
    return idx[:n]


def fewshot_prompt(kind: str, method: str, n_exemplars: int | None = None, exemplars: str | None = None) -> str:
    """Instruction + exemplars for a task kind and method, from prompts/<kind>_<method>.txt.

    `n_exemplars` keeps the file's first n; `exemplars` replaces them (e.g. FireAct's
    trajectories, `data.fireact_exemplars`) under the file's instruction. The text ends with a
    blank line, so appending f"Question: {q}\\n" starts one more exemplar.
    """
    if kind not in KINDS or method not in METHODS:
        raise ValueError(
            f"no few-shot prompt for kind={kind!r}, method={method!r}; "
            f"kinds: {', '.join(KINDS)}; methods: {', '.join(METHODS)}"
        )
    text = (PROMPT_DIR / f"{kind}_{method}.txt").read_text(encoding="utf-8")
    head, *shots = text.rstrip("\n").split("\n\nQuestion: ")
    shots = [exemplars.strip("\n")] if exemplars is not None else [f"Question: {s}" for s in shots[:n_exemplars]]
    return "\n\n".join([head, *shots]) + "\n\n"
