"""Test doubles for the LLM protocol: a scripted model and a call-counting wrapper.

`ScriptedLLM` answers each prompt from a script, so tests can drive the real agent loop
deterministically (malformed actions, API errors, reflexion). `CountingLLM` wraps a real
backend and counts what it is asked, so a test can prove that a resumed run generated nothing.
Both are importable from a subprocess (see test_reliability's kill test), so they live here
rather than in conftest.

    llm = ScriptedLLM(by_question({"alpha": ["Action: finish[Paris]"]}))
"""

from __future__ import annotations

import time
from collections.abc import Callable

from fireact_utils.llm import LLM, Generation, Prompt

Reply = str | Generation


def prompt_text(prompt: Prompt) -> str:
    """A prompt as one string: chat messages are joined one message per line."""
    return prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)


def by_question(script: dict[str, list[Reply]]) -> Callable[[str], Reply]:
    """Replies keyed by a marker in the question: the n-th prompt containing a marker gets its
    n-th reply (the last one repeats once the list runs out). Markers must not contain each other."""
    turns = dict.fromkeys(script, 0)

    def reply(text: str) -> Reply:
        hits = [k for k in script if k in text]
        if len(hits) != 1:
            raise AssertionError(f"prompt matches {len(hits)} script markers {hits}; expected exactly one")
        key = hits[0]
        replies = script[key]
        out = replies[min(turns[key], len(replies) - 1)]
        turns[key] += 1
        return out

    return reply


class ScriptedLLM:
    """The LLM protocol answered by `reply(prompt_text) -> str | Generation`; records every prompt."""

    def __init__(self, reply: Callable[[str], Reply], name: str = "scripted", delay_s: float = 0.0):
        self.reply, self.name, self.delay_s = reply, name, delay_s
        self.chat = False
        self.prompts: list[str] = []
        self.calls = 0  # generate() calls (one per agent turn for a whole batch)

    def generate(self, prompts: list[Prompt], stop: list[str], max_new_tokens: int = 128,
                 temperature: float = 0.0) -> list[Generation]:
        self.calls += 1
        if self.delay_s:
            time.sleep(self.delay_s)  # stands in for model latency, so a kill can land mid-run
        out = []
        for p in prompts:
            text = prompt_text(p)
            self.prompts.append(text)
            r = self.reply(text)
            out.append(r if isinstance(r, Generation) else Generation(r, len(text.split()), len(r.split())))
        return out


class CountingLLM:
    """Wraps a real backend; counts generate() calls and prompts, passes everything through."""

    def __init__(self, inner: LLM):
        self.inner, self.name, self.chat = inner, inner.name, inner.chat
        self.calls = 0
        self.n_prompts = 0

    def generate(self, prompts: list[Prompt], stop: list[str], max_new_tokens: int = 128,
                 temperature: float = 0.0) -> list[Generation]:
        self.calls += 1
        self.n_prompts += len(prompts)
        return self.inner.generate(prompts, stop, max_new_tokens, temperature)


# ---------------------------------------------------------------- a staged toy rollout

def staged_task(n: int):
    """A toy QA task whose question k the staged model answers after k+1 turns, so a batch run
    finishes one episode per turn: a kill lands between saved episodes."""
    from fireact_utils.tasks import Task

    return Task("staged", "dev", "qa", [f"Question #{k}: what is answer {k}?" for k in range(n)],
                [f"answer {k}" for k in range(n)])


def staged_reply(text: str) -> str:
    """Stateless (a resumed process gives the same replies): search until turn k+1, then finish."""
    k = int(text.split("Question #", 1)[1].split(":", 1)[0])
    turns_done = text.count("Observation: ")
    if turns_done >= k:
        return f"Thought: I know it.\nAction: finish[answer {k}]"
    return f"Thought: search more.\nAction: search[answer {k} part {turns_done}]"


def staged_search(query: str) -> str:
    return f"Observation text for {query}."


def wiki_reply(text: str) -> str:
    """Stateless, for a real wiki task: search the question's own words until turn len(question) % 4,
    then a wrong answer, so a batch's episodes finish on different turns."""
    episode = text.rsplit("Question:", 1)[1]
    question = episode.strip().split("\n")[0]
    if episode.count("Observation:") >= len(question) % 4:
        return "Thought: I give up.\nAction: finish[no idea]"
    return f"Thought: search it.\nAction: search[{question}]"
