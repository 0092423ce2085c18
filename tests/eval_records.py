"""Few-shot and fine-tuned ReAct records of three real HotpotQA dev questions, made by the real
agent loop (`run_episodes`) with a scripted model: on the first both agents are wrong (the
fine-tuned one searches until max_turns), on the second only few-shot is right (after a search),
on the third only fine-tuned is right (after a search). Notebook 03's episode pair and summaries
are tested on them.

    base, ft, task = react_records(data_dir)
"""

from __future__ import annotations

from scripted import ScriptedLLM, by_question

from fireact_utils.agent import run_episodes
from fireact_utils.config import AgentParams
from fireact_utils.tasks import Task, eval_indices, load_task

WRONG = "1998"  # the few-shot agent's wrong answer on both questions it misses: a numeric top answer


def _search(query: str) -> str:
    return f"Results for {query}: nothing useful."


def react_records(data_dir) -> tuple[list[dict], list[dict], Task]:
    task = load_task("hotpotqa", "dev", data_dir)
    idx = eval_indices(task, 3)
    q = [task.questions[i] for i in idx]
    gold = [task.answers[i] for i in idx]
    base_script = {q[0]: [f"Thought: I recall it.\nAction: finish[{WRONG}]"],
                   q[1]: ["Thought: look it up.\nAction: search[first topic]", f"Action: finish[{gold[1]}]"],
                   q[2]: [f"Thought: I recall it.\nAction: finish[{WRONG}]"]}
    ft_script = {q[0]: ["Thought: look it up.\nAction: search[zeroth topic]"],  # until max_turns: no answer
                 q[1]: ["Thought: I know this.\nAction: finish[Nobody]"],
                 q[2]: ["Thought: look it up.\nAction: search[second topic]", f"Action: finish[{gold[2]}]"]}
    base = run_episodes(task, idx, ScriptedLLM(by_question(base_script)), _search,
                        AgentParams(method="react", mode="fewshot", max_turns=4), progress=False)
    ft = run_episodes(task, idx, ScriptedLLM(by_question(ft_script)), _search,
                      AgentParams(method="react", mode="finetuned", max_turns=4), progress=False)
    return base, ft, task
