"""Search tools on FireAct's real data: recorded replay, SerpAPI cache (no network), noise, the factory."""

from __future__ import annotations

import json
import random

import pytest

from fireact_utils import config
from fireact_utils.config import SearchParams, cache_dir
from fireact_utils.io import read_json
from fireact_utils.tools import (
    EMPTY_QUERY,
    NO_RESULTS,
    NoisyTool,
    RecordedSearch,
    SerpAPISearch,
    ToolError,
    extract_pairs,
    extract_serpapi_answer,
    make_search,
    noise_pool,
)
from fireact_utils.wiki import WikiSearch

FAKE_KEY = "fake-serpapi-key-0123456789"
DEAD_ENDPOINT = "http://127.0.0.1:9/search.json"  # discard port: refused at once, nothing leaves the machine


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FIREACT_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """One RecordedSearch for the read-only tests (extraction takes ~0.3 s)."""
    try:
        root = config.data_dir()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FIREACT_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield RecordedSearch(root)


@pytest.fixture
def alpaca_search(data_dir) -> tuple[str, str]:
    """(query, observation) of the first search in FireAct's alpaca hotpotqa file, parsed by hand."""
    for row in read_json(data_dir / "finetune/alpaca_format/hotpotqa.json"):
        lines = row["output"].split("\n")
        for line, nxt in zip(lines, lines[1:], strict=False):
            if line.startswith("Action: search[") and nxt.startswith("Observation: "):
                return line[len("Action: search[") : line.rindex("]")], nxt[len("Observation: ") :]
    raise AssertionError("no search in the alpaca file")


# ---------------------------------------------------------------- recorded replay


def test_recorded_pair_count(recorded):
    # 4,890 distinct normalized queries in the released data: a change in extraction changes the count
    assert len(recorded.pairs) == 4890
    assert "Alden Ehrenreich Tetro], search[Tye Sheridan Tetro], search[Jack Huston Tetro], search[Jennifer Aniston Tetro], search[Toni Collette Tetro" in recorded.pairs


def test_exact_hit_returns_recorded_snippet(recorded, alpaca_search):
    query, obs = alpaca_search
    before = recorded.exact_hits
    assert recorded(query) == obs
    assert recorded(f'  "{query.upper()}?"  ') == obs  # case, quotes, spaces, trailing "?" are normalized away
    assert recorded.exact_hits == before + 2
    assert 0 < recorded.hit_rate <= 1 and recorded.stats()["exact_hits"] == recorded.exact_hits


def test_bm25_fallback_for_paraphrase(recorded):
    before = (recorded.exact_hits, recorded.bm25_hits)
    obs = recorded("which kickboxer was called the world's best but had unsportsmanlike conduct and violent crimes")
    assert "Badr Hari" in obs
    assert (recorded.exact_hits, recorded.bm25_hits) == (before[0], before[1] + 1)


def test_empty_and_unknown_queries(recorded):
    assert recorded("   ") == EMPTY_QUERY
    assert recorded("qqzxv wwkjh") == NO_RESULTS  # no word of it occurs anywhere


def test_truncation(data_dir, alpaca_search):
    tool = RecordedSearch(data_dir, max_chars=20)
    query, obs = alpaca_search
    assert tool(query) == obs[:20]


def test_extract_pairs_rules():
    text = (
        "Thought: x\nAction: search[a [b] c]\nObservation: one\n"
        "Action: search[no observation follows]\nThought: y\n"
        "Action: search[cut off by the token limit\nObservation: two\n"
        "Action: finish[z]\nObservation: Episode finished, reward = True\n"
    )
    assert extract_pairs(text) == [("a [b] c", "one"), ("cut off by the token limit", "two")]


def test_cache_written_then_loaded(data_dir):
    first = RecordedSearch(data_dir)
    files = list((cache_dir() / "search").glob("recorded_*.json"))
    assert len(files) == 1
    # Prove the second instance reads the file: doctor one snippet and look for it.
    data = read_json(files[0])
    query = next(iter(data))
    data[query] = "doctored snippet"
    files[0].write_text(json.dumps(data))
    second = RecordedSearch(data_dir)
    assert second(query) == "doctored snippet"
    assert len(second.pairs) == len(first.pairs)


def test_corrupt_cache_is_rebuilt_with_warning(data_dir):
    first = RecordedSearch(data_dir)
    (path,) = (cache_dir() / "search").glob("recorded_*.json")
    path.write_text('{"who wrote hamlet": "trunc')
    with pytest.warns(UserWarning, match="corrupt"):
        again = RecordedSearch(data_dir)
    assert again.pairs == first.pairs
    assert read_json(path) == first.pairs  # rewritten whole


# ---------------------------------------------------------------- noise


def test_noise_rate_and_determinism(recorded):
    queries = list(recorded.pairs)[:50]
    runs = []
    for seed in (0, 0, 1):
        noisy = NoisyTool(recorded, rate=0.3, kind="none", seed=seed)
        runs.append([noisy(queries[i % 50]) for i in range(2000)])
        assert abs(noisy.corrupted / noisy.calls - 0.3) <= 0.04
    assert runs[0] == runs[1] and runs[0] != runs[2]
    # The calls in another order (another rollout schedule) get the same noise: each query's n-th
    # call is treated the same, whatever came between.
    noisy = NoisyTool(recorded, rate=0.3, kind="random", seed=0, pool=noise_pool(recorded))
    calls = [queries[i % 50] for i in range(2000)]
    shuffled = random.Random(1).sample(calls, len(calls))
    def per_query(qs, outs):
        d: dict[str, list[str]] = {}
        for q, o in zip(qs, outs, strict=True):
            d.setdefault(q, []).append(o)
        return d
    in_order = per_query(calls, [noisy(q) for q in calls])
    noisy = NoisyTool(recorded, rate=0.3, kind="random", seed=0, pool=noise_pool(recorded))
    assert per_query(shuffled, [noisy(q) for q in shuffled]) == in_order
    stats = noisy.stats()
    assert stats["noise_corrupted"] == noisy.corrupted and "exact_hits" in stats


def test_noise_kinds(recorded, alpaca_search):
    query, obs = alpaca_search
    assert {NoisyTool(recorded, rate=1.0, kind="none")(query) for _ in range(3)} == {"None"}
    noisy = NoisyTool(recorded, rate=1.0, kind="random", seed=3, pool=noise_pool(recorded))
    swapped = [noisy(query) for _ in range(20)]
    assert obs not in swapped and set(swapped) <= set(recorded.pairs.values())
    assert len(set(swapped)) > 1
    with pytest.raises(ValueError):
        NoisyTool(recorded, rate=1.5)


# ---------------------------------------------------------------- SerpAPI (never reaches the network)


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ({"answer_box": {"answer": "1838", "snippet": "s"}, "organic_results": [{"snippet": "o"}]}, "1838"),
        ({"answer_box": {"snippet": "box snippet", "snippet_highlighted_words": ["w"]}}, "box snippet"),
        ({"answer_box": {"snippet_highlighted_words": ["Seth MacFarlane", "x"]}, "organic_results": [{"snippet": "o"}]},
         "Seth MacFarlane"),
        ({"organic_results": [{"title": "no snippet"}, {"snippet": "second result"}]}, "second result"),
        ({"organic_results": []}, NO_RESULTS),
        ({"error": "Google hasn't returned any results for this query."}, NO_RESULTS),
    ],
)
def test_extract_serpapi_answer(tmp_path, response, expected):
    saved = tmp_path / "response.json"
    saved.write_text(json.dumps(response))
    assert extract_serpapi_answer(read_json(saved)) == expected


def test_serpapi_cache_hit_without_network(tmp_path, monkeypatch):
    monkeypatch.setenv("SERPAPI_API_KEY", FAKE_KEY)
    cache = tmp_path / "serpapi.json"
    cache.write_text(json.dumps({"who wrote hamlet": "William Shakespeare"}))
    tool = SerpAPISearch(cache, seed_from_recorded=False, endpoint=DEAD_ENDPOINT)
    assert tool("Who wrote  Hamlet?") == "William Shakespeare"
    assert (tool.calls, tool.cache_hits, tool.api_calls) == (1, 1, 0)


def test_serpapi_seeded_from_recorded(monkeypatch, data_dir, alpaca_search):
    monkeypatch.delenv("SERPAPI_API_KEY", raising=False)
    tool = SerpAPISearch(data_dir=data_dir, endpoint=DEAD_ENDPOINT)
    query, obs = alpaca_search
    assert tool(query) == obs and tool.api_calls == 0


def test_serpapi_uncached_without_key(tmp_path, monkeypatch):
    monkeypatch.delenv("SERPAPI_API_KEY", raising=False)
    tool = SerpAPISearch(tmp_path / "serpapi.json", seed_from_recorded=False, endpoint=DEAD_ENDPOINT)
    with pytest.raises(ToolError, match="SERPAPI_API_KEY"):
        tool("a query nobody cached")
    assert tool.api_calls == 0


def test_serpapi_key_never_leaks(tmp_path, monkeypatch):
    monkeypatch.setenv("SERPAPI_API_KEY", FAKE_KEY)
    cache = tmp_path / "serpapi.json"
    cache.write_text(json.dumps({"who wrote hamlet": "William Shakespeare"}))
    tool = SerpAPISearch(cache, seed_from_recorded=False, endpoint=DEAD_ENDPOINT, timeout_s=5)
    tool("who wrote hamlet")
    with pytest.raises(ToolError) as err:
        tool("a query nobody cached")  # the request URL carries the key; the error must not
    assert FAKE_KEY not in str(err.value) and err.value.__cause__ is None
    assert FAKE_KEY not in cache.read_text()


def test_serpapi_corrupt_cache_warns(tmp_path):
    cache = tmp_path / "serpapi.json"
    cache.write_text("{not json")
    with pytest.warns(UserWarning, match="corrupt"):
        tool = SerpAPISearch(cache, seed_from_recorded=False)
    assert tool.cache == {}


# ---------------------------------------------------------------- factory


def test_make_search(tmp_path, data_dir):
    params = SearchParams(kind="recorded", noise_rate=0.5, noise_kind="random", seed=7, max_obs_chars=50)
    tool = make_search(params, data_dir)
    assert isinstance(tool, NoisyTool) and isinstance(tool.tool, RecordedSearch)
    assert tool.tool.max_chars == 50 and tool.rate == 0.5 and tool.kind == "random"
    assert isinstance(make_search(SearchParams(), data_dir), RecordedSearch)
    with pytest.raises(ValueError, match="search.corpus"):
        make_search(SearchParams(kind="wiki"))
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"title": "t", "text": "some text"}) + "\n")
    wiki = make_search(SearchParams(kind="wiki", corpus=str(path), noise_rate=0.5, noise_kind="random"))
    assert isinstance(wiki.tool, WikiSearch) and wiki.pool == ["t: some text"]
    assert wiki.card()["noise"] == "0.5 random" and wiki.card()["search"] == "wiki"
