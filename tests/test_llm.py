"""LM backends on the real built-in model: GenerateBackend in-process, OpenAIBackend over a real
`transformers serve` on 127.0.0.1. Few prompts, few tokens: the CPU is shared."""

from __future__ import annotations

import pytest

from fireact_utils.agent import ACTION_LINE_END, STOP
from fireact_utils.config import LLMParams
from fireact_utils.llm import OpenAIBackend
from fireact_utils.stops import cut_at_stop

# Different lengths on purpose: batching them pads all but the longest.
PROMPTS = [
    "The capital of France is",
    "1, 2, 3, 4,",
    "Once upon a time, in a small village by the sea, there lived an old",
]


def _first_word_after(text: str, skip: int = 2) -> str:
    """A stop string the model will certainly produce: a word from the middle of its own output."""
    words = text.split()
    assert len(words) > skip, f"output too short to pick a stop word from: {text!r}"
    return " " + words[skip]


# ---------------------------------------------------------------- local backend


def test_local_greedy_deterministic_and_batch_invariant(local_llm):
    batched = local_llm.generate(PROMPTS, stop=[], max_new_tokens=6)
    again = local_llm.generate(PROMPTS, stop=[], max_new_tokens=6)
    single = [local_llm.generate([p], stop=[], max_new_tokens=6)[0] for p in PROMPTS]
    assert all(g.text.strip() for g in batched)
    assert [g.text for g in batched] == [g.text for g in again]  # greedy: no randomness
    # One-at-a-time has no padding; equal texts mean the padding, its mask and positions are right.
    assert [g.text for g in batched] == [g.text for g in single]
    assert [g.completion_tokens for g in batched] == [g.completion_tokens for g in single]


def test_local_token_counts(local_llm):
    gens = local_llm.generate(PROMPTS, stop=[], max_new_tokens=6)
    for p, g in zip(PROMPTS, gens, strict=True):
        assert g.prompt_tokens == len(local_llm.tok(p, add_special_tokens=False)["input_ids"])
        assert 0 < g.completion_tokens <= 6
        assert g.error is None


def test_local_stop_strings_cut(local_llm):
    full = local_llm.generate(["1, 2, 3, 4,"], stop=[], max_new_tokens=12)[0].text
    stop = " 7"
    assert stop in full, f"expected the model to count on: {full!r}"
    cut = local_llm.generate(["1, 2, 3, 4,"], stop=[stop], max_new_tokens=12)[0]
    assert stop not in cut.text
    assert cut.text == full[: full.index(stop)]
    assert cut.completion_tokens < 12  # generation stopped early, not just the text


def test_local_stop_pattern_keeps_its_match(local_llm):
    """A stop pattern (the agent's end of an Action line) ends generation where its match ends."""
    import re

    prompt = "Thought: I need to search for Paris.\nAction: search[Paris]\nObservation: Paris is the capital of " \
             "France.\nThought: So the answer is France.\nAction: finish[France]\n\nThought: I need to find the " \
             "capital of Italy.\n"
    full = local_llm.generate([prompt], stop=[], max_new_tokens=40)[0]
    assert re.search(r"^Action: .*\n", full.text, re.M), f"expected an Action line and more: {full.text!r}"
    cut = local_llm.generate([prompt], stop=[ACTION_LINE_END], max_new_tokens=40)[0]
    assert cut.text == cut_at_stop(full.text, [ACTION_LINE_END]) and cut.text.split("\n")[-1].startswith("Action: ")
    assert cut.completion_tokens < full.completion_tokens


@pytest.mark.parametrize(("text", "expected"), [
    ("Thought: x\nAction: search[a b]\nThought: y\nAction: finish[z]\n", "Thought: x\nAction: search[a b]"),
    (" search[q]\nThought: more", " search[q]"),  # the Action after a pending Thought
    ("Thought: a\nAction: finish[b]", "Thought: a\nAction: finish[b]"),  # no newline yet: not ended
    ("Thought: x\nAction: search[a]\nObservation: made up", "Thought: x\nAction: search[a]"),
    ("Thought: I will search[x] later\nand more", "Thought: I will search[x] later\nand more"),
])
def test_agent_stops_end_a_turn_at_its_action_line(text, expected):
    assert cut_at_stop(text, STOP) == expected


def test_local_chat_messages(local_llm):
    msgs = [{"role": "user", "content": "Name a color."}]
    chat, plain = local_llm.generate([msgs, "Name a color."], stop=[], max_new_tokens=6)
    assert chat.text.strip() and chat.completion_tokens > 0
    # The chat template wraps the message in role markers, so the prompt is longer than the bare text.
    assert chat.prompt_tokens > plain.prompt_tokens


def test_local_matches_model_generate_with_its_own_stops(local_llm):
    """`GenerateBackend`'s stop criterion (a row ends at its stop, checked on its text, or at any
    EOS) gives the texts of transformers' own `stop_strings`, greedy, left-padded."""
    import torch

    tok, model = local_llm.tok, local_llm.model
    stop = [" the", "\n"]
    ours = [g.text for g in local_llm.generate(PROMPTS, stop=stop, max_new_tokens=16)]
    tok.padding_side = "left"
    enc = tok(PROMPTS, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=16, do_sample=False, stop_strings=stop, tokenizer=tok,
                             pad_token_id=tok.pad_token_id, temperature=None, top_p=None, top_k=None)
    ref = [cut_at_stop(tok.decode([t for t in row if t != tok.pad_token_id], skip_special_tokens=True), stop)
           for row in out[:, enc.input_ids.shape[1]:].tolist()]
    assert ours == ref


def test_local_sampling_is_seeded(local_llm):
    import torch

    texts = []
    for _ in range(2):
        torch.manual_seed(7)
        texts.append([g.text for g in local_llm.generate(PROMPTS, stop=[], max_new_tokens=8, temperature=1.0)])
    assert texts[0] == texts[1]
    greedy = [g.text for g in local_llm.generate(PROMPTS, stop=[], max_new_tokens=8)]
    assert texts[0] != greedy  # temperature 1 over 3 x 8 tokens: some token differs from greedy


def test_generate_backend_chunks_and_stops_per_row(local_llm):
    """Chunks of 2 give the texts and token counts of one batch of 8 (padding changes nothing,
    greedy) with a stop string, the action-line pattern and chat messages; each row stops at its
    own stop."""
    from fireact_utils.llm import GenerateBackend

    gen = GenerateBackend(model=local_llm.model, tokenizer=local_llm.tok, batch_size=2)  # 2: chunks of the 3 prompts
    free = local_llm.generate(PROMPTS, stop=[], max_new_tokens=12)
    stop = [_first_word_after(free[2].text)]
    react = ["Question: Who wrote Hamlet?\nThought: I should search.\nAction: search[Hamlet]\nObservation: a play.\n"
             "Thought: Shakespeare wrote it.\n", "Question: 2 + 2?\nThought:"]
    msgs = [[{"role": "user", "content": "Say hello."}]]
    for prompts, st, n in ((PROMPTS, [], 12), (PROMPTS, stop, 12), (react, STOP, 40), (msgs, ["\n"], 10)):
        ours, theirs = local_llm.generate(prompts, st, n), gen.generate(prompts, st, n)
        assert [(g.text, g.prompt_tokens) for g in theirs] == [(g.text, g.prompt_tokens) for g in ours]
        assert all(t.completion_tokens <= n for t in theirs)
    cut = gen.generate(PROMPTS, stop, 12)
    assert cut[2].completion_tokens < free[2].completion_tokens  # it stopped at the stop word, not at 12 tokens


def test_local_backend_picks_the_decoder(model_path, capsys):
    """Without a vLLM environment (conftest hides it), auto decodes with model.generate and says so once."""
    from fireact_utils.config import ModelParams
    from fireact_utils.llm import GenerateBackend, local_backend, pick_decoder

    assert type(local_backend(ModelParams(name=model_path, device="cpu"))) is GenerateBackend
    assert pick_decoder(ModelParams(decoder="vllm")) == "vllm"
    assert capsys.readouterr().err.count("no vLLM environment") <= 1


# ---------------------------------------------------------------- OpenAI backend on transformers serve


def _served_backend(served, chat: bool) -> OpenAIBackend:
    return OpenAIBackend(LLMParams(backend="openai", base_url=served.base_url, model=served.model, chat=chat,
                                   timeout_s=120, max_retries=1, concurrency=2))


@pytest.mark.parametrize("chat", [True, False], ids=["chat", "text"])
def test_served_completion_and_stop(served_model, chat):
    llm = _served_backend(served_model, chat)
    prompt = "Count: 1, 2, 3, 4," if chat else "1, 2, 3, 4,"
    full = llm.generate([prompt], stop=[], max_new_tokens=8)[0]
    assert full.error is None, full.error
    assert full.text.strip() and full.prompt_tokens > 0 and 0 < full.completion_tokens <= 8
    stop = _first_word_after(full.text)
    # transformers serve leaves the stop text in its output; cut_at_stop must remove it.
    cut = llm.generate([prompt], stop=[stop], max_new_tokens=8)[0]
    assert cut.error is None, cut.error
    assert stop not in cut.text
    assert cut.text == cut_at_stop(full.text, [stop])
    assert llm.retries == 0 and llm.failures == []


def test_served_concurrent_batch_keeps_order(served_model):
    """Concurrent requests finish in any order; each answer comes back in its prompt's place."""
    llm = _served_backend(served_model, chat=False)
    prompts = [*PROMPTS[:3], *PROMPTS[:3][::-1]]
    together = llm.generate(prompts, stop=[], max_new_tokens=4)
    apart = {p: llm.generate([p], stop=[], max_new_tokens=4)[0].text for p in PROMPTS[:3]}
    assert len(set(apart.values())) == 3  # distinct answers: a swap would show
    assert [g.text for g in together] == [apart[p] for p in prompts]
    assert all(g.prompt_tokens > 0 and g.completion_tokens > 0 for g in together)


def test_served_chat_message_prompt(served_model):
    llm = _served_backend(served_model, chat=True)
    g = llm.generate([[{"role": "user", "content": "Name a color."}]], stop=[], max_new_tokens=6)[0]
    assert g.error is None and g.text.strip() and g.completion_tokens > 0


def test_text_completion_rejects_chat_prompt():
    # Refused before any request: the discard port would refuse a connection anyway.
    llm = OpenAIBackend(LLMParams(backend="openai", base_url="http://127.0.0.1:9/v1", chat=False, max_retries=0))
    g = llm.generate([[{"role": "user", "content": "hi"}]], stop=[], max_new_tokens=2)[0]
    assert g.text == "" and "needs string (or token id) prompts" in g.error


def test_vllm_stream_sends_an_episodes_next_turn_before_new_episodes(model_path):
    """`VLLMBackend.stream` keeps `concurrency` turns in flight and sends follow-up turns ahead of
    episodes not yet started: with 2 lanes, 6 episodes of 2 turns each end two by two in order,
    never all at the end (the server's HTTP call is replaced by one that records what it was sent)."""
    import threading
    import time

    from transformers import AutoTokenizer

    from fireact_utils.llm import Generation, VLLMBackend

    backend = object.__new__(VLLMBackend)
    backend.tok, backend.concurrency = AutoTokenizer.from_pretrained(model_path), 2
    backend._ensure_server = lambda: None
    sent, lock, running, most = [], threading.Lock(), [0], [0]

    def one(ids, *_a, **_k):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
            sent.append(backend.tok.decode(ids))
        time.sleep(0.05)
        with lock:
            running[0] -= 1
        return Generation("ok")

    backend._one = one
    ended = []

    def on_done(key, _gen):
        episode, turn = key
        if turn == 0:
            return [((episode, 1), f"episode {episode} turn 1")]
        ended.append(episode)
        return []

    backend.stream([((e, 0), f"episode {e} turn 0") for e in range(6)], [], 8, 0.0, on_done)
    assert most[0] == 2 and len(sent) == 12
    assert sent.index("episode 0 turn 1") < sent.index("episode 2 turn 0")  # the old FIFO sent all first turns first
    assert sorted(ended[:2]) == [0, 1] and sorted(ended) == list(range(6))
