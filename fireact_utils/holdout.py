"""Held-out questions: the sets a run is scored on, and the guards that keep choices and training off them.

Four rules make a run's numbers safe by construction rather than by care:
1. No choice (recipe, prompt, temperature, epochs, decoding setting) is made on a split that any
   evaluation of the run uses, nor on one of the kit's standing test sets (`check_choice`).
2. No training or sampling question (generation, a fine-tuning mixture, self-improvement, GRPO)
   is a question the run is scored or chooses on (`check_training`; generation leaves them out of
   its pool, `reserved_keys`; `dataset.drop_held_out` drops them from released data instead).
3. A split a choice was made on is never scored afterwards, by any run under the same output
   root: every choice is recorded (`CHOICES`), and only a selection's own conditions may score it.
4. A pre-registered study evaluates only under its registered, resolved settings (`preregister`).
Rules 3 and 4 hold at evaluation time: `pipeline.run_condition`, which every entry point (CLI,
notebooks, studies) evaluates through, calls `check_evaluation` first.

Questions are compared by key (`question_key`: case and spacing folded, then hashed), so one
question under two names (HotpotQA dev and HotpotQA-wiki, StrategyQA dev and StrategyQA-wiki) is
one question. The standing sets are facts about the data, held out in every run whatever its
params name: FireAct's dev-500 (seed 233's first 500; all 500 when any part is evaluated, since
other runs report on the rest) and HotpotQA-wiki val and test. The wiki tasks' keys are committed
(`question_keys.json`, split by split), so the guards read FireAct's data only: a run that never
searches Wikipedia (the demo) needs no multihop data. `write_question_keys` regenerates the file
from the data (`download --write-manifest`), and a test holds it equal to the data.

    holdout.check_choice(p)                                    # before a selection runs; records it
    holdout.check_training(p, [r["question"] for r in recs], "dataset")   # before a fine-tune
    holdout.check_evaluation(p, task, idx)                     # before a condition scores a question
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import keys
from .io import append_jsonl, atomic_write_json, atomic_write_text, iter_jsonl, read_json
from .tasks import WIKI_SPLIT_SIZES, WIKI_TASKS, eval_indices, load_task

if TYPE_CHECKING:
    from .config import Params
    from .tasks import Task

DEV500 = ("hotpotqa", "dev", 500, 233)  # task, split, n, seed: FireAct's evaluation subset
STANDING_TEST = (("hotpotqa-wiki", "test"),)  # the kit's test split besides dev-500: never chosen on
STANDING_VAL = (("hotpotqa-wiki", "val"),)  # validation: chosen on, never trained on
CHOICES = "choices.jsonl"  # <output_root>/choices.jsonl: one line per choice made by any run there
REGISTRATION = "preregistration.json"  # <run>/preregistration.json: a pre-registered study's settings
QUESTION_KEYS = Path(__file__).with_name("question_keys.json")  # wiki task -> split -> keys, in split order


class HoldoutError(ValueError):
    """A choice on an evaluation split, a training question that is held out, or a score on a split chosen on."""


def question_key(question: str) -> str:
    """A question as compared across tasks: lowercased, whitespace folded, hashed (sha256, 16 hex
    digits), so the committed keys of the wiki tasks (`QUESTION_KEYS`) hold no text of the data."""
    return hashlib.sha256(" ".join(question.lower().split()).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class QuestionSet:
    label: str  # e.g. "evaluate: hotpotqa dev (FireAct's dev-500)"
    keys: frozenset[str]


@functools.cache
def _committed() -> dict[str, dict[str, list[str]]]:
    return read_json(QUESTION_KEYS)


def split_keys(p: Params, task: str, split: str | None) -> tuple[str, str, list[str]]:
    """(task, split, its questions' keys in the split's order): a wiki task's from the committed
    `QUESTION_KEYS`, any other's from its data (FireAct's, or a question file)."""
    if task not in WIKI_TASKS:
        t = load_task(task, split, p.data_dir, p.multihop_dir)
        return t.name, t.split, [question_key(q) for q in t.questions]
    split = split or WIKI_TASKS[task][2]
    committed = _committed()[task]
    if split not in committed:
        raise ValueError(f"unknown split {split!r} for {task}; valid: {', '.join(committed)}")
    return task, split, committed[split]


def _whole(p: Params, label: str, task: str, split: str | None) -> QuestionSet:
    name, split, ks = split_keys(p, task, split)
    return QuestionSet(f"{label}: {name} {split}", frozenset(ks))


def wiki_question_keys(multihop_dir: str | Path | None = None) -> dict[str, dict[str, list[str]]]:
    """Every split of every wiki task as `QUESTION_KEYS` holds it, computed from the multihop data."""
    out: dict[str, dict[str, list[str]]] = {}
    for task, (_, _, default) in WIKI_TASKS.items():
        splits = ["train", *WIKI_SPLIT_SIZES] if task == "hotpotqa-wiki" else [default]  # train: the rest
        out[task] = {s: [question_key(q) for q in load_task(task, s, multihop_dir=multihop_dir).questions]
                     for s in splits}
    return out


def write_question_keys(multihop_dir: str | Path | None = None, path: Path = QUESTION_KEYS) -> Path:
    """Regenerate `QUESTION_KEYS` from the multihop data: one key a line, for readable diffs."""
    body = ",\n".join(f"  {json.dumps(task)}: {{\n" + ",\n".join(
        f"    {json.dumps(split)}: [\n" + ",\n".join(f'      "{k}"' for k in ks) + "\n    ]"
        for split, ks in splits.items()) + "\n  }" for task, splits in wiki_question_keys(multihop_dir).items())
    return atomic_write_text(path, "{\n" + body + "\n}\n")


def evaluation_sets(p: Params) -> list[QuestionSet]:
    """Every question set the run reports a number on: evaluate.task's questions (also the
    self-consistency ones; all of dev-500 when they are dev-500's), the noise, generalization,
    transfer and base-model evaluation tasks (whole splits), and the standing test sets: dev-500
    and HotpotQA-wiki test, whatever evaluate.* names (another task, split or shuffle seed)."""
    task, split, n500, seed500 = DEV500
    name, sp, ks = split_keys(p, p.evaluate.task, p.evaluate.split)
    n = max(p.evaluate.n_questions, p.study.sc_n)
    label = f"evaluate: {name} {sp}, first {n} (seed {p.evaluate.seed})"
    dev500 = (name, sp, p.evaluate.seed) == (task, split, seed500)
    if dev500:
        n, label = max(n, n500), f"evaluate: {name} {sp} (FireAct's dev-500)"
    sets = [QuestionSet(label, frozenset(ks[i] for i in eval_indices(len(ks), n, p.evaluate.seed)))]
    if not dev500:  # standing: held out even when evaluate.* names another task, split or seed
        dev = load_task(task, split, p.data_dir, p.multihop_dir)
        sets.append(QuestionSet("FireAct's dev-500", frozenset(question_key(dev.questions[i])
                                                               for i in eval_indices(dev, n500, seed500))))
    named = {(x, None) for x in [*p.study.noise_tasks, *p.study.generalization_tasks, *p.study.transfer_tasks]
             if x != p.evaluate.task}
    for name, sp in sorted(named | set(STANDING_TEST), key=str):
        sets.append(_whole(p, "evaluated", name, sp))
    for e in p.study.base_model_evals if p.study.base_models else []:  # the base-model axis: first n of each
        name, sp, k = e.rsplit(":", 2)
        bs = split_keys(p, name, sp)[2]
        sets.append(QuestionSet(f"study.base_model_evals: {e}",
                                frozenset(bs[i] for i in eval_indices(len(bs), int(k), p.evaluate.seed))))
    return list({s.label: s for s in sets}.values())  # a task named twice (noise and standing) once


def choice_set(p: Params) -> QuestionSet:
    """The split choices are made on: study.select_task / study.select_split."""
    return _whole(p, "study.select_task", p.study.select_task, p.study.select_split)


def _overlaps(qs: frozenset[str], sets: list[QuestionSet]) -> list[tuple[QuestionSet, int]]:
    return [(s, len(qs & s.keys)) for s in sets if qs & s.keys]


def check_choice(p: Params) -> None:
    """Refuse to choose on a split that shares a question with any evaluation set of the run;
    else record the choice (`record_choice`), since every caller is about to make one. A merge
    (`keys.saved_only`) chooses on the bundles' episodes: checked where they ran, recorded here."""
    chosen = choice_set(p)
    if not keys.is_saved_only() and (hits := _overlaps(chosen.keys, evaluation_sets(p))):
        where = "; ".join(f"{n} questions of {s.label}" for s, n in hits)
        raise HoldoutError(f"choices on {chosen.label.split(': ', 1)[1]} would be made on test questions ({where}): "
                           "set study.select_task/select_split to a validation split, e.g. hotpotqa-wiki val")
    record_choice(p)


def reserved_sets(p: Params) -> list[QuestionSet]:
    """Every set no training or sampling question may come from: the evaluation sets (dev-500 and
    HotpotQA-wiki test among them), the choice split and the standing validation split."""
    sets = [*evaluation_sets(p), choice_set(p)]
    return sets + [_whole(p, "validation", name, sp) for name, sp in STANDING_VAL if
                   (name, sp) != (p.study.select_task, p.study.select_split)]


def reserved_keys(p: Params) -> frozenset[str]:
    return frozenset().union(*(s.keys for s in reserved_sets(p)))


def without_held_out(p: Params, records: list[dict]) -> list[dict]:
    """`records` less those whose question is held out (dataset.drop_held_out), saying how many."""
    held = reserved_keys(p)
    kept = [r for r in records if question_key(r["question"]) not in held]
    if len(kept) < len(records):
        print(f"dataset.drop_held_out: dropped {len(records) - len(kept)} of {len(records)} training records "
              "whose question is held out")
    return kept


def check_training(p: Params, questions: Iterable[str], what: str) -> None:
    """Refuse training or sampling questions (`what` names their source) that a held-out set holds."""
    asked = {question_key(q): q for q in questions}
    if hits := _overlaps(frozenset(asked), reserved_sets(p)):
        example = " ".join(asked[min(asked.keys() & hits[0][0].keys)].split())
        where = "; ".join(f"{n} of {s.label}" for s, n in hits)
        raise HoldoutError(f"{what}: training questions are held-out questions of this run ({where}), "
                           f"e.g. {example!r}: train on other questions")


# ---------------------------------------------------------------- at evaluation time

def check_evaluation(p: Params, task: Task, idx: list[int]) -> None:
    """Before a condition scores `task`'s questions `idx`: the study's registered settings
    (`preregister`), and no question of a split a choice was made on (`check_unchosen`)."""
    if not keys.is_saved_only():  # a merge evaluates nothing: its bundles' registrations are compared instead
        preregister(p)
    check_unchosen(p, task, idx)


_selecting: ContextVar[bool] = ContextVar("selecting", default=False)


@contextmanager
def selecting() -> Iterator[None]:
    """Conditions run inside are a selection's own (`recipes.select_condition`): the only
    evaluations that may score a split chosen on, since their numbers are the choice's data."""
    token = _selecting.set(True)
    try:
        yield
    finally:
        _selecting.reset(token)


def choices_path(p: Params) -> Path:
    """The registry of choices, shared by every run under p's output root: a choice made under one
    run name binds the others, or the chosen-on split could be reported under a new name."""
    return p.run_dir.parent / CHOICES


def record_choice(p: Params) -> None:
    """Record that `p` chooses on study.select_task/select_split: run, task, split, n and the key of
    the questions a selection scores (the first select_n of the seeded shuffle; all without it).
    An identical line is written once, so resumed selections do not grow the file."""
    name, split, ks = split_keys(p, p.study.select_task, p.study.select_split)
    qs = [ks[i] for i in eval_indices(len(ks), p.study.select_n or len(ks), p.evaluate.seed)]
    line = {"run": p.name, "task": name, "split": split, "n": len(qs),
            "key": keys.data_hash({"question": q} for q in qs)}
    path = choices_path(p)
    if not path.is_file() or line not in iter_jsonl(path):
        append_jsonl(path, line)


def check_unchosen(p: Params, task: Task, idx: list[int]) -> None:
    """Refuse to score a question of a split that any recorded choice was made on (the whole split,
    compared as text: a subset chosen on makes the split a validation split), except inside
    `selecting`. One rule for every entry point and run name."""
    path = choices_path(p)
    if _selecting.get() or not path.is_file():
        return
    asked = frozenset(question_key(task.questions[i]) for i in idx)
    for c in {(c["task"], c["split"]): c for c in iter_jsonl(path)}.values():
        if n := len(asked & _whole(p, "chosen on", c["task"], c["split"]).keys):
            raise HoldoutError(f"{n} of the {len(asked)} questions to score on {task.name} {task.split} are of "
                               f"{c['task']} {c['split']}, which run {c['run']!r} chose on ({path}): a split a "
                               "choice was made on is never reported; evaluate on another split")


def registered_settings(p: Params) -> dict[str, Any]:
    """What a pre-registration fixes: every setting that moves a number (`keys.run_settings`; paths,
    ports and batch sizes left out) with its autos resolved on this machine (decoding device, dtype
    and decoder; the fine-tune's bf16), so `auto` cannot mean fp32 when registered and bf16 later."""
    from .models import pick_device
    from .train import use_bf16

    return {**keys.run_settings(p), **keys.model_settings(p.model),
            "train.bf16": use_bf16(p.train, pick_device(p.model.device))}


def preregister(p: Params) -> None:
    """With study.preregistered, the first call (`headline`, or the first evaluation from any entry
    point) writes <run>/preregistration.json with the resolved settings. Once it exists, every call
    refuses other settings (study.preregistered itself included), naming them: a pre-registered
    run is run once, as registered, never re-tuned under its name."""
    path = p.run_dir / REGISTRATION
    if not (path.is_file() or p.study.preregistered):
        return
    now = registered_settings(p)
    if not path.is_file():
        atomic_write_json(path, {"params": p.dump(), "settings": now})
        return
    was = read_json(path).get("settings")
    if was is None:
        raise ValueError(f"{path} holds no resolved settings (written by an older kit): register the study "
                         "under a new name")
    if diff := keys.differences(_nulls(was), _nulls(now)):
        raise ValueError(f"{p.name} was pre-registered with other settings ({'; '.join(diff[:3])}"
                         f"{'; ...' if len(diff) > 3 else ''}): a pre-registered run is run as registered; "
                         "give a new study another name")


def _nulls(settings: dict[str, Any]) -> dict[str, Any]:
    """None as a value ("null"): `keys.differences` skips None as unknown, but every registered
    setting is known, and adding a model.adapter to a registered None is a change."""
    return {k: "null" if v is None else v for k, v in settings.items()}
