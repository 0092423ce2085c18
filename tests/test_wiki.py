"""The offline Wikipedia environment on the real multihop corpora: search, index cache, tasks and
their splits, fidelity, and a whole condition run through the pipeline with a scripted agent."""

from __future__ import annotations

import json
import shutil

import pytest
from scripted import ScriptedLLM, by_question

from fireact_utils.agent import run_episodes
from fireact_utils.config import AgentParams, SearchParams, load_params
from fireact_utils.evaluate import markdown_table
from fireact_utils.io import DataFileError, atomic_write_json, read_json, read_jsonl
from fireact_utils.pipeline import run_condition
from fireact_utils.provenance import machine_label, merge_tool_stats
from fireact_utils.tables import outcome_table, table_extras
from fireact_utils.tasks import WIKI_TASKS, load_task
from fireact_utils.tools import EMPTY_QUERY, NO_RESULTS, NoisyTool, make_search, noise_pool
from fireact_utils.wiki import WikiSearch, cut_words, evidence, fidelity, outcome, retrieved_titles


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    # one cache per module run, so the index-cache test sees a build and then a load
    monkeypatch.setenv("FIREACT_CACHE", str(tmp_path_factory.getbasetemp() / "wiki-cache"))


@pytest.fixture(scope="module")
def hotpot_wiki(multihop_dir):
    return WikiSearch("hotpotqa", multihop_dir=multihop_dir)


@pytest.mark.parametrize("name", list(WIKI_TASKS))
def test_gold_paragraph_for_the_questions_own_wording(multihop_dir, name):
    """BM25 with the bare question puts a gold paragraph first for most questions (the data's
    docs/environments.md measured 80 / 87 / 91%); each corpus holds every gold paragraph."""
    task = load_task(name, None, multihop_dir=multihop_dir)
    tool = WikiSearch(task.corpus, multihop_dir=multihop_dir)
    assert {t for g in task.gold_titles for t in g} <= set(tool.titles)
    top = [tool.titles[tool.retrieve(q)[0]] in g for q, g in zip(task.questions[:60], task.gold_titles, strict=False)]
    assert sum(top) / len(top) >= 0.7
    hits = tool.retrieve(task.questions[0], k=5)
    assert len(hits) == 5 and any(tool.titles[i] in task.gold_titles[0] for i in hits)


def test_observation_format(hotpot_wiki):
    obs = hotpot_wiki("Big Stone Gap film director")
    assert obs.startswith("Big Stone Gap (film): Big Stone Gap is a 2014 American drama")
    assert len(obs) <= 600 and obs == cut_words(obs, 600)
    three = WikiSearch("hotpotqa", top_k=3, max_chars=300)("Big Stone Gap film director")
    assert three.startswith("[1] Big Stone Gap (film): ") and "[2] " in three and "[3] " in three
    assert all(len(part) <= 100 + 4 for part in three.split(" [")[1:])


@pytest.mark.parametrize("k", [1, 3])
def test_retrieved_titles_invert_the_observation(hotpot_wiki, multihop_dir, k):
    """What each observation shows, read back from its text alone, is the paragraphs the search retrieved,
    titles holding ': ' included (the corpus has both 'Catan' and 'Catan: Seafarers')."""
    tool = WikiSearch("hotpotqa", top_k=k, multihop_dir=multihop_dir)
    titles = set(tool.titles)
    task = load_task("hotpotqa-wiki", None, multihop_dir=multihop_dir)
    queries = [*task.questions[:40], "Catan Seafarers board game expansion", "Catan board game"]
    shown = [(retrieved_titles(obs, titles), [tool.titles[i] for i in hits]) for hits, obs in map(tool.observe, queries)]
    assert all(got == want for got, want in shown) and sum(len(w) for _, w in shown) == k * len(queries)
    assert any(": " in t for got, _ in shown for t in got)
    assert retrieved_titles(NO_RESULTS, titles) == retrieved_titles("None", titles) == []


def test_empty_and_stopword_queries(hotpot_wiki):
    assert hotpot_wiki("") == EMPTY_QUERY and hotpot_wiki("   ") == EMPTY_QUERY
    assert hotpot_wiki("the of and") == NO_RESULTS
    assert hotpot_wiki.stats()["empty_queries"] >= 2 and hotpot_wiki.stats()["misses"] >= 1


def test_cut_words():
    assert cut_words("alpha beta gamma", 100) == "alpha beta gamma"
    assert cut_words("alpha beta gamma", 12) == "alpha beta"  # never a word cut in half
    assert cut_words("alpha beta gamma", 10) == "alpha beta"
    assert cut_words("supercalifragilistic", 5) == "super"  # no space: a hard cut


def test_index_cached_and_rebuilt_when_the_corpus_changes(tmp_path, monkeypatch, multihop_dir):
    monkeypatch.setenv("FIREACT_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus.jsonl"
    shutil.copy(multihop_dir / "2wikimultihopqa" / "corpus.jsonl", corpus)
    first = WikiSearch(corpus)
    index_dirs = list((tmp_path / "cache" / "wiki").iterdir())
    assert len(index_dirs) == 1 and (index_dirs[0] / "done").is_file()
    again = WikiSearch(corpus)  # loaded, not rebuilt: same directory, same answers
    assert list((tmp_path / "cache" / "wiki").iterdir()) == index_dirs
    assert again("Free Guy director") == first("Free Guy director")
    with open(corpus, "a") as f:  # the corpus changes: a new paragraph must be findable
        f.write(json.dumps({"title": "Zorblax Quintessence", "text": "A zorblax is a made-up word."}) + "\n")
    changed = WikiSearch(corpus)
    assert changed.digest != first.digest and len(list((tmp_path / "cache" / "wiki").iterdir())) == 2
    assert changed("zorblax").startswith("Zorblax Quintessence: ")
    assert first("zorblax") == NO_RESULTS


def test_corrupt_corpus_line_named(tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(json.dumps({"title": "a", "text": "b"}) + "\n" + '{"title": "broken",\n')
    with pytest.raises(DataFileError, match=r"c\.jsonl line 2: malformed JSON"):
        WikiSearch(corpus)
    corpus.write_text(json.dumps({"title": "a"}) + "\n")
    with pytest.raises(DataFileError, match=r"c\.jsonl line 1: .*'title' and 'text'"):
        WikiSearch(corpus)
    corpus.write_text("\n")
    with pytest.raises(DataFileError, match="no paragraphs"):
        WikiSearch(corpus)
    with pytest.raises(DataFileError, match="corpus not found"):
        WikiSearch(tmp_path / "missing.jsonl")


def test_missing_multihop_dir_names_the_variable(monkeypatch, tmp_path):
    monkeypatch.setenv("FIREACT_MULTIHOP_DIR", str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="FIREACT_MULTIHOP_DIR"):
        load_task("hotpotqa-wiki")


def test_hotpotqa_wiki_splits(multihop_dir):
    rows = [json.loads(line) for line in open(multihop_dir / "hotpotqa" / "questions.jsonl")]
    dev500 = {r["question"] for r in rows if r["in_fireact_dev500"]}
    splits = {s: load_task("hotpotqa-wiki", s, multihop_dir=multihop_dir) for s in ("train", "val", "test")}
    assert {s: len(t) for s, t in splits.items()} == {"train": 293, "val": 200, "test": 300}
    qs = {s: set(t.questions) for s, t in splits.items()}
    assert not (qs["train"] & qs["val"]) and not (qs["train"] & qs["test"]) and not (qs["val"] & qs["test"])
    assert len(dev500) == 58 and dev500 <= qs["test"]  # dev-500 questions are never trained or tuned on
    assert load_task("hotpotqa-wiki", "val", multihop_dir=multihop_dir).questions == splits["val"].questions
    assert load_task("hotpotqa-wiki", multihop_dir=multihop_dir).split == "test"
    sqa = load_task("strategyqa-wiki", multihop_dir=multihop_dir)
    assert len(sqa) == 229 and sqa.kind == "yesno" and set(sqa.answers) == {"yes", "no"}
    assert len(load_task("2wikimultihopqa", multihop_dir=multihop_dir)) == 164
    with pytest.raises(ValueError, match="unknown split 'dev' for hotpotqa-wiki"):
        load_task("hotpotqa-wiki", "dev", multihop_dir=multihop_dir)


def _record(idx: int, steps: list[dict], em: bool, status: str = "finished") -> dict:
    return {"idx": idx, "steps": steps, "em": em, "status": status}


def test_evidence_fidelity_and_outcomes(hotpot_wiki, multihop_dir):
    task = load_task("hotpotqa-wiki", "val", multihop_dir=multihop_dir)
    gold = task.gold_titles[0]  # ['Adriana Trigiani', 'Big Stone Gap (film)']
    q1, q2 = "Big Stone Gap film director", "Adriana Trigiani"
    s1 = {"action": "search", "arg": q1, "observation": hotpot_wiki(q1)}
    s2 = {"action": "search", "arg": q2, "observation": hotpot_wiki(q2)}
    noisy = {**s2, "observation": "None"}  # what a noisy tool showed instead
    fin = {"action": "finish", "arg": "x", "observation": "Episode finished, reward = False"}
    assert [hotpot_wiki.titles[hotpot_wiki.retrieve(q)[0]] for q in (q1, q2)] == ["Big Stone Gap (film)", "Adriana Trigiani"]
    both = evidence(_record(0, [s1, s2, fin], False), gold, hotpot_wiki)
    assert both == {"searches": 2, "gold_top": 2, "saw_any_gold": True, "saw_all_gold": True}
    half = evidence(_record(0, [s1, noisy, fin], False), gold, hotpot_wiki)
    assert half == {"searches": 2, "gold_top": 1, "saw_any_gold": True, "saw_all_gold": False}
    recs = [_record(0, [s1, s2, fin], True), _record(0, [s1, s2, fin], False),
            _record(0, [s1, noisy, fin], False), _record(0, [s1], False, "max_turns")]
    assert [outcome(r, evidence(r, gold, hotpot_wiki)) for r in recs] == [
        "correct", "saw evidence, wrong answer", "missed evidence", "never finished"]
    fid = fidelity(recs, task.gold_titles, hotpot_wiki)
    assert fid["searches"] == 7 and fid["gold_top_rate"] == pytest.approx(6 / 7)
    assert fid["saw_all_gold_rate"] == 0.5 and fid["saw_any_gold_rate"] == 1.0
    assert fid["outcomes"] == {"correct": 1, "saw evidence, wrong answer": 1, "missed evidence": 1, "never finished": 1}


def test_random_noise_draws_other_paragraphs(hotpot_wiki):
    noisy = NoisyTool(hotpot_wiki, 1.0, "random", 0, noise_pool(hotpot_wiki))
    clean = hotpot_wiki("Big Stone Gap film director")
    swapped = {noisy("Big Stone Gap film director") for _ in range(10)}
    assert clean not in swapped and len(swapped) > 1
    assert all(": " in s and len(s) <= 600 for s in swapped)


def test_merge_tool_stats_covers_every_run():
    first = {"tool": "recorded", "calls": 10, "exact_hits": 5, "hit_rate": 0.5, "recorded_pairs": 100, "noise_rate": 0.5}
    second = {"tool": "recorded", "calls": 30, "exact_hits": 3, "hit_rate": 0.1, "recorded_pairs": 100, "noise_rate": 0.5}
    merged = merge_tool_stats(first, second)
    assert merged["calls"] == 40 and merged["exact_hits"] == 8 and merged["hit_rate"] == pytest.approx(8 / 40)
    assert merged["recorded_pairs"] == 100 and merged["noise_rate"] == 0.5
    assert merge_tool_stats(None, second) == second


def test_wiki_condition_through_the_pipeline(tmp_path):
    """A scripted agent on HotpotQA-wiki: the task brings its corpus, the meta holds the
    environment card and fidelity, and the tables show both."""
    p = load_params("params/smoke.yaml", {"output_root": str(tmp_path)})

    def reply(text: str) -> str:  # search the question's own wording once, then a wrong answer
        if "Observation:" in text.rsplit("Question:", 1)[1]:
            return "Thought: I give up.\nAction: finish[no idea]"
        question = text.rsplit("Question:", 1)[1].strip().split("\n")[0]
        return f"Thought: search it.\nAction: search[{question}]"

    recs = run_condition(p, "wiki_scripted", ScriptedLLM(reply), AgentParams(max_turns=4), task="hotpotqa-wiki", n=3)
    meta = read_json(p.run_dir / "eval" / "wiki_scripted.meta.json")
    assert meta["task"] == "hotpotqa-wiki" and meta["split"] == "test" and len(recs) == 3
    assert meta["environment"]["search"] == "wiki" and "10,708 paragraphs" in meta["environment"]["corpus"]
    fid = meta["fidelity"]
    assert fid["searches"] == 3 and fid["outcomes"]["correct"] == 0 and fid["outcomes"]["never finished"] == 0
    assert fid["outcomes"]["missed evidence"] + fid["outcomes"]["saw evidence, wrong answer"] == 3
    assert fid["gold_top_rate"] >= 1 / 3  # the question's own wording mostly finds a gold paragraph
    extras = table_extras(p, ["wiki_scripted"])["wiki scripted"]
    assert extras["environment"].startswith("wiki: hotpotqa (10,708 paragraphs); BM25")
    assert extras["gold_top_rate"] == fid["gold_top_rate"] and "saw_all_gold_rate" in extras
    assert outcome_table(p)["condition"].tolist() == ["wiki scripted"]
    here = machine_label()
    assert meta["machines"] == {here: {"episodes": 3, "wall_s": pytest.approx(meta["wall_s"])}}
    assert extras["machine"] == here
    # resumed on another machine: each keeps its episodes and seconds, and the table names both
    meta["machines"] = {"NVIDIA H200": meta["machines"].pop(here)}
    atomic_write_json(p.run_dir / "eval" / "wiki_scripted.meta.json", meta)
    # other agent settings may not continue it (nothing is lost); another batch size may
    with pytest.raises(ValueError, match=r"other settings \(agent.max_turns 4 -> 3\)"):
        run_condition(p, "wiki_scripted", ScriptedLLM(reply), AgentParams(max_turns=3), task="hotpotqa-wiki", n=4)
    assert len(read_jsonl(p.run_dir / "eval" / "wiki_scripted.jsonl")) == 3
    run_condition(p, "wiki_scripted", ScriptedLLM(reply), AgentParams(max_turns=4, batch_size=2), task="hotpotqa-wiki", n=4)
    machines = read_json(p.run_dir / "eval" / "wiki_scripted.meta.json")["machines"]
    assert [(k, v["episodes"]) for k, v in machines.items()] == [("NVIDIA H200", 3), (here, 1)]
    assert table_extras(p, ["wiki_scripted"])["wiki scripted"]["machine"] == f"NVIDIA H200 + {here}"


def test_scripted_episode_sees_the_gold(hotpot_wiki, multihop_dir):
    """The agent loop in the wiki environment: two searches surface both gold paragraphs."""
    task = load_task("hotpotqa-wiki", "val", multihop_dir=multihop_dir)
    llm = ScriptedLLM(by_question({task.questions[0]: [
        "Thought: find the film.\nAction: search[Big Stone Gap film director]",
        "Thought: now her.\nAction: search[Adriana Trigiani]",
        f"Thought: done.\nAction: finish[{task.answers[0]}]"]}))
    tool = make_search(SearchParams(), corpus=task.corpus)
    [rec] = run_episodes(task, [0], llm, tool, AgentParams(max_turns=4), progress=False)
    assert rec["em"] and rec["steps"][0]["observation"].startswith("Big Stone Gap (film): ")
    assert fidelity([rec], task.gold_titles, tool)["saw_all_gold_rate"] == 1.0
    table_md = markdown_table(_one_row_table(rec, tool.card()))
    assert "gold top %" not in table_md and "[1] wiki: hotpotqa (10,708 paragraphs)" in table_md


def _one_row_table(rec: dict, card: dict):
    from fireact_utils.evaluate import results_table
    from fireact_utils.tables import environment_label

    return results_table({"scripted": [rec]}, 50, extra={"scripted": {"environment": environment_label(card)}})
