"""ReAct / CoT / IO / Reflexion agents, rolled out in batches.

An episode is one `Episode` object keyed by its id. At every turn all unfinished episodes
generate together (one batched `generate` on a local model, concurrent requests on an API),
then each parses its action and calls the tool. A finished episode is appended to the JSONL
output at once, so a killed run loses at most the episodes in flight; re-running with the
same file skips what is saved.

    recs = run_episodes(task, eval_indices(len(task), 100), llm, search, AgentParams(), "out.jsonl")

Prompt modes:
- fewshot:   exemplars + "Question: q\\n" + scratchpad (base models, teachers)
- finetuned: FireAct's zero-shot formats: Alpaca header + scratchpad, or chat messages.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from .config import AgentParams
from .io import append_jsonl, iter_jsonl
from .llm import LLM, Generation, StreamingLLM
from .tasks import Task, fewshot_prompt
from .trajectories import ACTION_RE, FINISH_OBS, alpaca_prompt, react_text, to_chat

# A turn ends where its first Action line ends (the pattern), whatever follows: a model that never
# learned to write "Observation" (fine-tuned with loss on its own tokens only) otherwise goes on
# inventing Thought/Action pairs until max_new_tokens. A prompt ending in "Action:" (a pending
# Thought) gets the bare "search[...]" line, which ends the turn too.
ACTION_LINE_END = re.compile(r"^[ \t]*(?:Action[ \t\d]*:|(?:search|finish)\[)[^\n]*(?=\n)", re.M)
STOP = ["\nObservation", "\nQuestion:", ACTION_LINE_END]
MAX_TOOL_ERRORS = 3  # consecutive tool failures before an episode ends with `tool_error`
EXIT_STATUSES = ("finished", "max_turns", "parse_error", "tool_error", "api_error")
SEARCH_FIRST = "Search before you answer: reply with 'Action: search[query]'."  # agent.min_searches
INVALID_ACTION = "Invalid action. Reply with one line 'Action: search[query]' or 'Action: finish[answer]'."
REFLECT_PROMPT = (
    "You tried to answer the question below and your answer was wrong. In two sentences, say what went wrong "
    "and what you will do differently next time.\n\nQuestion: {question}\n{scratchpad}\nReflection:"
)


@dataclass
class Episode:
    """Everything about one question's rollout; becomes the JSONL record."""

    id: str
    idx: int
    question: str
    gold: str
    method: str
    steps: list[dict] = field(default_factory=list)
    answer: str | None = None
    status: str | None = None
    trial: int = 0
    reflections: list[str] = field(default_factory=list)
    pending_thought: str | None = None  # a Thought with no Action yet: the next prompt asks for the Action
    prompt_tokens: int = 0
    completion_tokens: int = 0
    llm_calls: int = 0
    tool_calls: int = 0
    tool_errors: int = 0
    errors: list[str] = field(default_factory=list)
    t_start: float = field(default_factory=time.time)
    wall_s: float = 0.0

    @property
    def done(self) -> bool:
        return self.status is not None


def parse_step(text: str) -> dict:
    """Parse one generation into {thought, action, arg, error}. Never raises.

    Tolerates a missing "Thought:" prefix, text after the action line, and `finish` without
    brackets ("Action: finish Paris"). Unknown tools are the caller's business.
    """
    thought_lines, action_line = [], None
    for line in text.strip().split("\n"):
        s = line.strip()
        if s.startswith("Action:") or re.match(r"^(search|finish)\[", s):
            action_line = s[len("Action:"):].strip() if s.startswith("Action:") else s
            break
        thought_lines.append(s[len("Thought:"):].strip() if s.startswith("Thought:") else s)
    thought = " ".join(t for t in thought_lines if t).strip()
    if action_line is None:
        # CoT habit: "... So the answer is X." with no action line.
        m = re.search(r"answer is[:\s]+(.+?)\.?\s*$", thought, re.I)
        if m:
            return {"thought": thought, "action": "finish", "arg": m.group(1).strip(), "error": None}
        return {"thought": thought, "action": "", "arg": "", "error": "no action"}
    if re.fullmatch(r"(search|finish)", action_line, re.I):
        return {"thought": thought, "action": "", "arg": action_line, "error": f"{action_line} without argument"}
    m = ACTION_RE.match(action_line)
    if m:
        return {"thought": thought, "action": m.group(1).lower(), "arg": m.group(2).strip(), "error": None}
    m = re.match(r"^(\w+)\s*[\[:(]?\s*(.*?)[\])]?$", action_line)  # unbalanced or missing brackets
    if m and m.group(1).lower() in ("search", "finish") and m.group(2):
        return {"thought": thought, "action": m.group(1).lower(), "arg": m.group(2).strip(), "error": None}
    return {"thought": thought, "action": "", "arg": action_line, "error": f"malformed action {action_line[:80]!r}"}


class Agent:
    """Prompting and stepping for one method and mode over one task."""

    def __init__(self, task: Task, params: AgentParams, search: Callable[[str], str] | None,
                 fewshot: str | None = None):
        self.task, self.p, self.search = task, params, search
        method = "react" if params.method == "reflexion" else params.method
        self.base_method = method
        if params.mode == "fewshot" and fewshot is None:
            fewshot = fewshot_prompt(task.kind, method, params.n_exemplars)
        self.fewshot = fewshot or ""  # `fewshot` (instruction + exemplars) replaces the kit's prompt

    def prompt(self, ep: Episode, chat: bool = False):
        """The prompt for the next generation of `ep`."""
        reflections = "".join(f"Reflection: {r}\n" for r in ep.reflections)
        if self.p.mode == "finetuned" and self.p.format == "chat":
            return to_chat({"question": ep.question, "steps": ep.steps})["messages"]
        scratch = react_text(ep.steps)
        if ep.pending_thought is not None:
            scratch += f"Thought: {ep.pending_thought}\nAction:"
        if self.p.mode == "finetuned":
            return alpaca_prompt(ep.question) + scratch
        text = f"{self.fewshot}\n{reflections}Question: {ep.question}\n{scratch}"
        return [{"role": "user", "content": text}] if chat or self.p.chat_template else text

    def step(self, ep: Episode, gen: Generation) -> None:
        """Apply one generation to `ep`: parse, act, observe, maybe finish."""
        ep.llm_calls += 1
        ep.prompt_tokens += gen.prompt_tokens
        ep.completion_tokens += gen.completion_tokens
        if gen.error:
            ep.errors.append(gen.error)
            return self.finish(ep, None, "api_error")
        if ep.pending_thought is not None:
            # The prompt ended in "Action:"; the generation's first line is the action.
            line = gen.text.strip().split("\n")[0].strip().removeprefix("Action:").strip()
            parsed = {**parse_step(f"Action: {line}"), "thought": ep.pending_thought}
            ep.pending_thought = None
        else:
            parsed = parse_step(gen.text)
            chat = self.p.mode == "finetuned" and self.p.format == "chat"
            if parsed["error"] == "no action" and parsed["thought"] and self.base_method == "react" and not chat:
                # ReAct's own remedy for a model that stops after its Thought: prompt for the Action.
                ep.pending_thought = parsed["thought"]
                return
        step = {"thought": parsed["thought"], "action": parsed["action"], "arg": parsed["arg"], "observation": None}
        ep.steps.append(step)
        if parsed["action"] == "finish" and self.base_method == "react" and ep.tool_calls < self.p.min_searches:
            # The ReAct game enforced: an answer before the tool was used is refused, as an invalid action is.
            step["observation"] = SEARCH_FIRST
            ep.errors.append("finish before search")
        elif parsed["action"] == "finish" or (self.base_method != "react" and parsed["action"] == "search"):
            # CoT/IO have no tool: whatever they act on is their answer.
            step["action"] = "finish"
            return self.finish(ep, parsed["arg"], "finished")
        elif parsed["error"] or parsed["action"] != "search":
            step["observation"] = INVALID_ACTION if parsed["error"] else f"Unknown tool {parsed['action']!r}. {INVALID_ACTION}"
            ep.errors.append(parsed["error"] or f"unknown tool {parsed['action']}")
            if self.base_method != "react":
                return self.finish(ep, None, "parse_error")
        else:
            ep.tool_calls += 1
            try:
                step["observation"] = self.search(parsed["arg"])
                ep.tool_errors = 0
            except Exception as e:  # noqa: BLE001 - tool failures are observations, not crashes
                ep.tool_errors += 1
                ep.errors.append(f"tool: {type(e).__name__}: {e}")
                step["observation"] = f"Search failed ({type(e).__name__}). Try again or another query."
                if ep.tool_errors >= MAX_TOOL_ERRORS:
                    return self.finish(ep, None, "tool_error")
        if len(ep.steps) >= 3 and all(s["action"] != "search" for s in ep.steps[-3:]):
            # three invalid actions in a row (unparseable or unknown tool): the model is lost
            self.finish(ep, None, "parse_error")
        elif len(ep.steps) >= self.p.max_turns:
            self.finish(ep, None, "max_turns")

    def finish(self, ep: Episode, answer: str | None, status: str) -> None:
        ep.answer, ep.status = answer, status
        if ep.steps and answer is not None:
            score = self.task.evaluate(ep.idx, answer)
            ep.steps[-1]["observation"] = FINISH_OBS.format(reward=score["em"])
        ep.wall_s = time.time() - ep.t_start

    def record(self, ep: Episode, model_name: str) -> dict:
        score = self.task.evaluate(ep.idx, ep.answer or "")
        rec = asdict(ep)
        rec.pop("t_start")
        rec.update(task=self.task.name, split=self.task.split, mode=self.p.mode, format=self.p.format,
                   model=model_name, turns=len(ep.steps), em=bool(score["em"] and ep.answer is not None),
                   f1=float(score["f1"]) if ep.answer is not None else 0.0, pred=score["pred"], gt=score["gt"])
        rec["reward"] = rec["em"]
        return rec


def episode_id(task: Task, idx: int, trial_tag: str = "") -> str:
    return f"{task.name}/{task.split}/{idx}{trial_tag}"


def load_done(out_path: str | Path | None) -> dict[str, dict]:
    """Finished records already in `out_path`, by id (a torn last line is ignored)."""
    if not out_path or not Path(out_path).is_file():
        return {}
    return {r["id"]: r for r in iter_jsonl(out_path)}


def progress_bar(total: int, desc: str, enabled: bool = True) -> tqdm:
    """tqdm.auto's bar, off when TQDM_DISABLE is set: tqdm's notebook bar ignores that variable, and
    the notebook chain sets it so that executed notebooks hold no stale bars."""
    off = os.environ.get("TQDM_DISABLE", "").lower() in ("1", "true")
    return tqdm(total=total, desc=desc, disable=not enabled or off)


def run_episodes(task: Task, indices: Iterable[int], llm: LLM, search: Callable[[str], str] | None,
                 params: AgentParams, out_path: str | Path | None = None, redo: bool = False,
                 progress: bool = True, fewshot: str | None = None,
                 on_saved: Callable[[dict], None] | None = None) -> list[dict]:
    """Roll out one episode per index; return records in index order (saved ones included).
    `fewshot` replaces the kit's few-shot prompt (instruction + exemplars); `on_saved` sees each
    record once it is written."""
    indices = list(dict.fromkeys(indices))  # a repeated index would write a duplicate record
    # api_error episodes are re-run: an outage must not leave permanent failures (the newest record wins).
    done = {} if redo else {k: r for k, r in load_done(out_path).items() if r["status"] != "api_error"}
    if redo and out_path and Path(out_path).exists():
        Path(out_path).unlink()
    agent = Agent(task, params, search, fewshot)
    chat_llm = llm.chat
    todo = [Episode(episode_id(task, i), i, task.questions[i], task.answers[i], params.method)
            for i in indices if episode_id(task, i) not in done]
    bar = progress_bar(len(todo), f"{task.name} {params.method}/{params.mode}", progress)
    finished: dict[str, dict] = {}

    def after(ep: Episode, gen: Generation) -> bool:
        """Apply a generation to its episode; True while the episode goes on."""
        agent.step(ep, gen)
        if ep.done and params.method == "reflexion" and _should_retry(agent, ep, params):
            _reflect(agent, ep, llm, params)
        if ep.done:
            rec = agent.record(ep, llm.name)
            if out_path:
                append_jsonl(out_path, rec)
            finished[ep.id] = rec
            if on_saved:
                on_saved(rec)
            bar.update(1)
        return not ep.done

    if isinstance(llm, StreamingLLM):  # continuous batching: an episode's next turn starts as soon as its last one ends
        llm.stream([(ep, agent.prompt(ep, chat_llm)) for ep in todo], STOP, params.max_new_tokens, params.temperature,
               lambda ep, gen: [(ep, agent.prompt(ep, chat_llm))] if after(ep, gen) else [])
    else:  # turn by turn: all unfinished episodes generate together (concurrently, over HTTP)
        active = todo
        while active:
            gens = llm.generate([agent.prompt(e, chat_llm) for e in active], STOP, params.max_new_tokens,
                                params.temperature)
            active = [ep for ep, gen in zip(active, gens, strict=True) if after(ep, gen)]
    bar.close()
    by_id = {**done, **finished}
    return [by_id[episode_id(task, i)] for i in indices if episode_id(task, i) in by_id]


def _should_retry(agent: Agent, ep: Episode, p: AgentParams) -> bool:
    ok = ep.answer is not None and agent.task.evaluate(ep.idx, ep.answer)["em"]
    return not ok and ep.status != "api_error" and ep.trial + 1 < p.reflexion_trials


def _reflect(agent: Agent, ep: Episode, llm: LLM, p: AgentParams) -> None:
    """Reflexion: ask for a self-reflection on the failed attempt, then restart the episode with it."""
    gen = llm.generate([REFLECT_PROMPT.format(question=ep.question, scratchpad=react_text(ep.steps))],
                       ["\n\n", "\nQuestion:"], p.max_new_tokens, p.temperature)[0]
    ep.llm_calls += 1
    ep.prompt_tokens += gen.prompt_tokens
    ep.completion_tokens += gen.completion_tokens
    ep.reflections.append(gen.text.strip() or "(no reflection)")
    ep.trial += 1
    ep.steps, ep.answer, ep.status = [], None, None
    ep.tool_errors, ep.pending_thought = 0, None  # a fresh attempt: failures of the last one don't count


def summarize(records: list[dict]) -> dict:
    """Counts and means a results table needs; statuses always listed, even at zero."""
    n = len(records) or 1
    out = {
        "n": len(records),
        "em": sum(r["em"] for r in records) / n,
        "f1": sum(r["f1"] for r in records) / n,
        "turns": sum(r["turns"] for r in records) / n,
        "finish_rate": sum(r["status"] == "finished" for r in records) / n,
        "prompt_tokens": sum(r["prompt_tokens"] for r in records) / n,
        "completion_tokens": sum(r["completion_tokens"] for r in records) / n,
    }
    out.update({f"status_{s}": sum(r["status"] == s for r in records) for s in EXIT_STATUSES})
    return out
