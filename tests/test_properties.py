"""Properties of the pure parsing and scoring functions, over generated inputs (hypothesis)."""

from __future__ import annotations

import re
import string

from hypothesis import given, settings
from hypothesis import strategies as st

from fireact_utils.agent import parse_step
from fireact_utils.stops import cut_at_stop
from fireact_utils.tasks import normalize_answer
from fireact_utils.trajectories import parse_react_text, react_text

PARSE_KEYS = {"thought", "action", "arg", "error"}

# Agent-ish text: the markers the parser looks for, mixed with arbitrary characters and newlines.
_pieces = st.sampled_from(["Thought:", "Action:", "Observation:", "search", "finish", "[", "]", "(", ")", ":",
                           "\n", " ", "answer is", ".", "Search", "FINISH", "lookup"])
agent_text = st.lists(st.one_of(_pieces, st.text(max_size=8)), max_size=30).map("".join)

# One line of text (no newline): thoughts, args and observations of a step.
line = st.text(st.characters(blacklist_characters="\n", blacklist_categories=("Cs",)), max_size=30)
action_name = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,9}", fullmatch=True)
step = st.fixed_dictionaries({"thought": line, "action": action_name, "arg": line,
                              "observation": st.one_of(st.none(), line)})


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(), agent_text))
def test_parse_step_total(text):
    out = parse_step(text)
    assert set(out) == PARSE_KEYS
    assert all(isinstance(out[k], str) for k in ("thought", "action", "arg"))
    action = out["action"]
    # "", a known tool, or a word of the text lowercased (an unknown tool, for the agent to reject)
    assert action in ("", "search", "finish") or action in {w.lower() for w in re.findall(r"\w+", text)}
    assert (out["error"] is None) == (action != "")  # an error exactly when there is no action


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_normalize_answer_idempotent_and_clean(s):
    norm = normalize_answer(s)
    assert normalize_answer(norm) == norm
    assert norm == norm.lower()
    assert not set(norm) & set(string.punctuation + string.ascii_uppercase)
    assert norm == norm.strip() and "  " not in norm
    assert not {"a", "an", "the"} & set(norm.split())


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60), st.lists(st.text(min_size=1, max_size=4), max_size=4))
def test_cut_at_stop_is_the_prefix_before_any_stop(text, stops):
    out = cut_at_stop(text, stops)
    assert text.startswith(out)
    assert not any(s in out for s in stops)
    if not any(s in text for s in stops):
        assert out == text
    else:
        assert any(text[len(out):].startswith(s) for s in stops)  # cut exactly at a stop string


@settings(max_examples=200, deadline=None)
@given(st.lists(step, min_size=1, max_size=5))  # no steps: parse_react_text("") gives preamble "\n"
def test_react_text_round_trips(steps):
    preamble, parsed = parse_react_text(react_text(steps))
    assert preamble == ""
    assert parsed == steps
