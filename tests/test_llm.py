"""LM backends on the real built-in model: LocalBackend in-process, OpenAIBackend over a real
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


def test_local_matches_model_generate(local_llm):
    """Our decoding loop (rows leave the batch at their stop, stored KV reused) gives the texts
    of transformers' own left-padded `generate`, greedy, with stop strings."""
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


@pytest.mark.parametrize("share", [True, False], ids=["shared-prefix", "copied-prefix"])
def test_local_reuses_stored_prefixes(local_llm, monkeypatch, share):
    """Turn 2 prompts extend turn 1 prompts + generations: their keys/values come from the store
    (the shared exemplars on turn 1, each row's own history on turn 2), and the texts equal those
    of prefilling everything from scratch. Exemplars are held once for all rows (CPU), or copied
    into each row (`share` off: the path of GPUs and non-SDPA models)."""
    from fireact_utils.decoding import Decoder
    from fireact_utils.llm import LocalBackend

    if not share:
        monkeypatch.setattr(Decoder, "share", property(lambda self: False))

    shots = "Question: What is 2 + 2?\nAnswer: 4\n" * 12  # a shared "few-shot" block of ~150 tokens
    turn1 = [f"{shots}Question: {q}\nAnswer:" for q in ("What is 3 + 5?", "Name a red fruit.", "Capital of Italy?")]
    fresh = LocalBackend(model=local_llm.model, tokenizer=local_llm.tok, batch_size=8, prefix_cache=False)
    local_llm.decoder.store.clear()
    before = local_llm.decoder.cached_prompt_tokens
    g1 = local_llm.generate(turn1, stop=["\n"], max_new_tokens=8)
    shots_tokens = len(local_llm.tok(shots, add_special_tokens=False)["input_ids"])
    # Nothing stored yet: the shared block is computed once, for the first row, and reused by the other two.
    assert 2 * (shots_tokens - 2) <= local_llm.decoder.cached_prompt_tokens - before <= 2 * (shots_tokens + 8)
    turn2 = [p + g.text + "\nQuestion: And 1 + 1?\nAnswer:" for p, g in zip(turn1, g1, strict=True)]
    before = local_llm.decoder.cached_prompt_tokens
    g2 = local_llm.generate(turn2, stop=["\n"], max_new_tokens=8)
    turn1_tokens = sum(g.prompt_tokens for g in g1)
    assert local_llm.decoder.cached_prompt_tokens - before >= turn1_tokens  # each row's turn 1 was reused
    entries = list(local_llm.decoder.store.entries.values())
    prefix = local_llm.decoder.prefix
    if share:  # the exemplars are held once: stored rows keep only their own tokens after them
        assert prefix is not None and len(prefix.ids) >= shots_tokens - 2
        rows = [e for e in entries if e.start]
        assert len(rows) == 3  # each row's turn 2 superseded its turn 1
        assert all(e.start == len(prefix.ids) and e.kv[0][0].shape[1] == len(e.ids) - e.start for e in rows)
    else:  # each row's entry holds its whole history, exemplars included
        assert prefix is None and len(entries) == 3
        assert all(e.start == 0 and e.kv[0][0].shape[1] == len(e.ids) for e in entries)
    assert [g.text for g in g1] == [g.text for g in fresh.generate(turn1, stop=["\n"], max_new_tokens=8)]
    assert [g.text for g in g2] == [g.text for g in fresh.generate(turn2, stop=["\n"], max_new_tokens=8)]
    assert fresh.decoder.cached_prompt_tokens == 0


def test_local_stream_follow_ups_join_the_running_batch(local_llm):
    """A follow-up request (an episode's next turn) starts while other rows still generate: the
    short row's follow-up ends before the long row, and every text equals the one generated alone."""
    stop = [" 6", " 9"]
    prompts = {"count": "1, 2, 3, 4,", "story": PROMPTS[2], "count2": "1, 2, 3, 4, 5, 6, 7,"}
    order, texts = [], {}

    def on_done(key, gen):
        order.append(key)
        texts[key] = gen.text
        return [("count2", prompts["count2"])] if key == "count" else []

    local_llm.stream([("count", prompts["count"]), ("story", prompts["story"])], stop, 16, 0.0, on_done)
    assert texts["count"] == " 5," and texts["count2"] == " 8,"
    assert order == ["count", "count2", "story"]
    alone = {k: local_llm.generate([p], stop, max_new_tokens=16)[0].text for k, p in prompts.items()}
    assert texts == alone


def test_local_without_buffers_uses_plain_cache(local_llm):
    """The path for models whose layers need transformers' own cache (sliding windows...)."""
    from fireact_utils.llm import LocalBackend

    plain = LocalBackend(model=local_llm.model, tokenizer=local_llm.tok, batch_size=8)
    plain.decoder.buffers, plain.decoder.store = False, None
    assert [g.text for g in plain.generate(PROMPTS, stop=[], max_new_tokens=6)] == \
        [g.text for g in local_llm.generate(PROMPTS, stop=[], max_new_tokens=6)]


def test_local_sampling_is_seeded(local_llm):
    import torch

    texts = []
    for _ in range(2):
        torch.manual_seed(7)
        texts.append([g.text for g in local_llm.generate(PROMPTS, stop=[], max_new_tokens=8, temperature=1.0)])
    assert texts[0] == texts[1]
    greedy = [g.text for g in local_llm.generate(PROMPTS, stop=[], max_new_tokens=8)]
    assert texts[0] != greedy  # temperature 1 over 3 x 8 tokens: some token differs from greedy


# ---------------------------------------------------------------- model.generate backend (the GPU default)


def test_generate_backend_equals_ours_and_stops_where_ours_does(local_llm):
    """Greedy texts and token counts of `GenerateBackend` equal the kit decoder's, with a stop
    string, the action-line pattern, and chat messages; each row stops at its own stop."""
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


def test_local_backend_picks_the_decoder_by_device(model_path):
    from fireact_utils.config import ModelParams
    from fireact_utils.llm import GenerateBackend, LocalBackend, local_backend

    assert type(local_backend(ModelParams(name=model_path, device="cpu"))) is LocalBackend  # auto on CPU: the kit's
    assert type(local_backend(ModelParams(name=model_path, device="cpu", decoder="generate"))) is GenerateBackend


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
    assert g.text == "" and "needs string prompts" in g.error
