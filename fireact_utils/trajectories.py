"""One trajectory record, and its formats as pure functions of it.

A record is a dict with at least `question` and `steps`; each step is
`{"thought": str, "action": str, "arg": str, "observation": str}` (thought may be "").
ReAct text, Alpaca rows and chat messages are all derived from the steps, so the agent's
fine-tuned prompts and the training data can never drift apart.

    text = react_text(steps)            # "Thought: …\nAction: search[…]\nObservation: …\n…"
    row = to_alpaca(record)             # {"instruction", "input", "output"} (FireAct's shape)
    msgs = to_chat(record)              # [{"role": "user", …}, {"role": "assistant", …}, …]
"""

from __future__ import annotations

import ast
import re

ALPACA_HEADER = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
FINISH_OBS = "Episode finished, reward = {reward}"
# `name[arg]` where arg runs to the LAST closing bracket: queries may hold nested brackets.
ACTION_RE = re.compile(r"^\s*(\w+)\s*\[(.*)\]\s*$", re.S)


def format_action(action: str, arg: str) -> str:
    # An unparseable action is kept as the model wrote it (action "", arg = raw text).
    return f"{action}[{arg}]" if action else arg


def step_text(step: dict) -> str:
    """One agent turn (what the model generates): optional Thought line + Action line."""
    head = f"Thought: {step['thought']}\n" if step.get("thought") else ""
    return f"{head}Action: {format_action(step['action'], step['arg'])}"


def react_text(steps: list[dict], preamble: str = "") -> str:
    """The whole scratchpad, observations included, each line newline-terminated."""
    out = preamble
    for s in steps:
        out += step_text(s) + "\n"
        if s.get("observation") is not None:
            out += f"Observation: {s['observation']}\n"
    return out


def alpaca_prompt(question: str) -> str:
    return ALPACA_HEADER.format(instruction=question)


def to_alpaca(record: dict) -> dict:
    out = react_text(record["steps"], record.get("preamble", ""))
    if record.get("eol") is False:  # some released CoT rows lack the final newline; keep them byte-exact
        out = out.removesuffix("\n")
    return {"instruction": record["question"], "input": "", "output": out}


def to_chat(record: dict) -> dict:
    """FireAct's chat shape: user question, assistant Thought+Action turns, user Observation turns."""
    msgs = [{"role": "user", "content": record["question"]}]
    pre = record.get("preamble", "")
    for i, s in enumerate(record["steps"]):
        msgs.append({"role": "assistant", "content": (pre if i == 0 else "") + step_text(s)})
        if s.get("observation") is not None:
            msgs.append({"role": "user", "content": f"Observation: {s['observation']}"})
    return {"messages": msgs}


def _after(line: str, prefix: str) -> str:
    """Text after `prefix` and one space, kept verbatim so parsing round-trips exactly."""
    rest = line[len(prefix):]
    return rest[1:] if rest.startswith(" ") else rest


def parse_react_text(text: str) -> tuple[str, list[dict]]:
    """Inverse of `react_text`: (preamble, steps). Lines before the first Thought/Action are the
    preamble (FireAct's MMLU rows list the options there); continuation lines join their field."""
    preamble_lines: list[str] = []
    steps: list[dict] = []
    cur: dict | None = None
    field = None
    for line in text.rstrip("\n").split("\n"):
        if line.startswith("Thought:"):
            cur = {"thought": _after(line, "Thought:"), "action": "", "arg": "", "observation": None}
            steps.append(cur)
            field = "thought"
        elif line.startswith("Action:"):
            if cur is None or cur["action"]:
                cur = {"thought": "", "action": "", "arg": "", "observation": None}
                steps.append(cur)
            m = ACTION_RE.match(line[len("Action:"):])
            cur["action"], cur["arg"] = (m.group(1), m.group(2)) if m else ("", line[len("Action:"):].strip())
            field = "action"
        elif line.startswith("Observation:") and cur is not None:
            cur["observation"] = _after(line, "Observation:")
            field = "observation"
        elif cur is None:
            preamble_lines.append(line)
        elif field in ("thought", "observation") and cur[field] is not None:
            cur[field] += "\n" + line
    preamble = "\n".join(preamble_lines) + "\n" if preamble_lines else ""
    return preamble, steps


def parse_chat(messages: list[dict] | str) -> tuple[str, list[dict]]:
    """(question, steps) from FireAct chat messages (or their Python-repr string)."""
    if isinstance(messages, str):
        messages = ast.literal_eval(messages)
    question = messages[0]["content"]
    text = ""
    for m in messages[1:]:
        text += m["content"].rstrip("\n") + "\n"
    _, steps = parse_react_text(text)
    return question, steps


def final_reward(steps: list[dict]) -> bool | None:
    """Reward recorded in the last observation ('Episode finished, reward = True/1'), if any."""
    if not steps or steps[-1].get("action") != "finish":
        return None
    obs = (steps[-1].get("observation") or "").strip()
    m = re.search(r"reward\s*=\s*(\w+)", obs)
    return None if not m else m.group(1) in ("True", "1", "1.0")
