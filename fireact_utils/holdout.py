"""Held-out questions: the sets a run is scored on, and the guards that keep choices and training off them.

Two rules make a run's numbers safe by construction rather than by care:
1. No choice (recipe, prompt, temperature, epochs, decoding setting) is made on a split that any
   evaluation of the run uses, nor on one of the kit's standing test sets (`check_choice`).
2. No training or sampling question (generation, a fine-tuning mixture, self-improvement, GRPO)
   is a question the run is scored or chooses on (`check_training`; generation leaves them out of
   its pool, `reserved_keys`; `dataset.drop_held_out` drops them from released data instead).

Questions are compared as text (case and spacing folded), so one question under two names
(HotpotQA dev and HotpotQA-wiki, StrategyQA dev and StrategyQA-wiki) is one question. The
standing sets are held out in every run, whatever its params name: FireAct's dev-500 (all 500
when any part is evaluated, since other runs report on the rest) and HotpotQA-wiki val and test.

    holdout.check_choice(p)                                    # before a selection runs
    holdout.check_training(p, [r["question"] for r in recs], "dataset")   # before a fine-tune
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .tasks import eval_indices, load_task

if TYPE_CHECKING:
    from .config import Params

DEV500 = ("hotpotqa", "dev", 500, 233)  # task, split, n, seed: FireAct's evaluation subset
STANDING_TEST = (("hotpotqa-wiki", "test"),)  # the kit's test split besides dev-500: never chosen on
STANDING_VAL = (("hotpotqa-wiki", "val"),)  # validation: chosen on, never trained on


class HoldoutError(ValueError):
    """A choice on an evaluation split, or a training question that is held out."""


def question_key(question: str) -> str:
    """A question as compared across tasks: lowercased, whitespace folded."""
    return " ".join(question.lower().split())


@dataclass(frozen=True)
class QuestionSet:
    label: str  # e.g. "evaluate: hotpotqa dev (FireAct's dev-500)"
    keys: frozenset[str]


def _whole(p: Params, label: str, task: str, split: str | None) -> QuestionSet:
    t = load_task(task, split, p.data_dir, p.multihop_dir)
    return QuestionSet(f"{label}: {t.name} {t.split}", frozenset(question_key(q) for q in t.questions))


def evaluation_sets(p: Params) -> list[QuestionSet]:
    """Every question set the run reports a number on: evaluate.task's questions (also the
    self-consistency ones; all of dev-500 when any of it is evaluated), the noise, generalization,
    transfer and base-model evaluation tasks (whole splits), and the standing test sets."""
    task, split, n500, seed500 = DEV500
    t = load_task(p.evaluate.task, p.evaluate.split, p.data_dir, p.multihop_dir)
    n = max(p.evaluate.n_questions, p.study.sc_n)
    label = f"evaluate: {t.name} {t.split}, first {n} (seed {p.evaluate.seed})"
    if (t.name, t.split, p.evaluate.seed) == (task, split, seed500):
        n, label = max(n, n500), f"evaluate: {t.name} {t.split} (FireAct's dev-500)"
    sets = [QuestionSet(label, frozenset(question_key(t.questions[i]) for i in eval_indices(t, n, p.evaluate.seed)))]
    if (t.name, t.split) != (task, split):  # dev-500 is standing: held out even when another task is evaluated
        dev = load_task(task, split, p.data_dir, p.multihop_dir)
        sets.append(QuestionSet("FireAct's dev-500", frozenset(question_key(dev.questions[i])
                                                               for i in eval_indices(dev, n500, seed500))))
    named = {(x, None) for x in [*p.study.noise_tasks, *p.study.generalization_tasks, *p.study.transfer_tasks]
             if x != p.evaluate.task}
    for name, sp in sorted(named | set(STANDING_TEST), key=str):
        sets.append(_whole(p, "evaluated", name, sp))
    for e in p.study.base_model_evals if p.study.base_models else []:  # the base-model axis: first n of each
        name, sp, k = e.rsplit(":", 2)
        b = load_task(name, sp, p.data_dir, p.multihop_dir)
        sets.append(QuestionSet(f"study.base_model_evals: {e}", frozenset(
            question_key(b.questions[i]) for i in eval_indices(b, int(k), p.evaluate.seed))))
    return list({s.label: s for s in sets}.values())  # a task named twice (noise and standing) once


def choice_set(p: Params) -> QuestionSet:
    """The split choices are made on: study.select_task / study.select_split."""
    return _whole(p, "study.select_task", p.study.select_task, p.study.select_split)


def _overlaps(keys: frozenset[str], sets: list[QuestionSet]) -> list[tuple[QuestionSet, int]]:
    return [(s, len(keys & s.keys)) for s in sets if keys & s.keys]


def check_choice(p: Params) -> None:
    """Refuse to choose on a split that shares a question with any evaluation set of the run."""
    chosen = choice_set(p)
    if hits := _overlaps(chosen.keys, evaluation_sets(p)):
        where = "; ".join(f"{n} questions of {s.label}" for s, n in hits)
        raise HoldoutError(f"choices on {chosen.label.split(': ', 1)[1]} would be made on test questions ({where}): "
                           "set study.select_task/select_split to a validation split, e.g. hotpotqa-wiki val")


def reserved_sets(p: Params) -> list[QuestionSet]:
    """Every set no training or sampling question may come from: the evaluation sets, the choice
    split and the standing validation split."""
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
    keys = {question_key(q) for q in questions}
    if hits := _overlaps(frozenset(keys), reserved_sets(p)):
        example = sorted(keys & hits[0][0].keys)[0]
        where = "; ".join(f"{n} of {s.label}" for s, n in hits)
        raise HoldoutError(f"{what}: training questions are held-out questions of this run ({where}), "
                           f"e.g. {example!r}: train on other questions")
