"""Search tools for the agent: every tool is a callable `tool(query: str) -> str` with counters.

- `RecordedSearch` replays the Google results FireAct recorded in its data (~4,900 queries):
  normalized exact match first, else BM25 over recorded query + snippet. Offline and free, but
  a BM25 answer is the result of a *different* query, so always report `stats()` beside scores.
- `SerpAPISearch` is live Google through SerpAPI, with a persistent cache seeded from the
  recorded results so that the paper's own queries cost nothing.
- `wiki.WikiSearch` is BM25 over real Wikipedia paragraphs (the multihop data, or any JSONL of
  `{"title", "text"}`), with gold paragraphs to check results against.
- `NoisyTool` corrupts a fraction of observations (the paper's robustness study).

    tool = make_search(params.search)      # from fireact_utils.config.SearchParams
    obs = tool("director of Tetro")
    tool.stats()                            # {"calls": 1, "exact_hits": ..., "hit_rate": ...}
    tool.card()                             # the environment card: search kind, corpus, retriever, k, noise

Shortcuts: observations are cut at `max_chars` characters (no word-boundary care); BM25 uses
bm25s' default tokenizer with English stopwords and no stemmer.
"""

from __future__ import annotations

import ast
import hashlib
import os
import random
import re
import time
import warnings
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote_plus

from fireact_utils.config import FETCH, SearchParams, cache_dir, data_file, default
from fireact_utils.config import data_dir as resolve_data_dir
from fireact_utils.io import DataFileError, atomic_write_json, iter_jsonl, read_json

EMPTY_QUERY = "Empty search query."
NO_RESULTS = "No results found."
SERPAPI_URL = "https://serpapi.com/search.json"
_EXTRACT_VERSION = 1  # bump when the extraction rules change, so old recorded caches are ignored
_ACTION_RE = re.compile(r"^Action(?:\s*\d+)?:\s*search\[(.*)$", re.I)
_OBS_RE = re.compile(r"^Observation(?:\s*\d+)?:\s?(.*)$")
_QUOTES = " \"'`\u201c\u201d\u2018\u2019"
MAX_OBS_CHARS = default(SearchParams, "max_obs_chars")


class ToolError(Exception):
    """The tool could not answer (network, HTTP status, missing key); the agent logs a tool_error."""


class SearchTool(Protocol):
    def __call__(self, query: str) -> str: ...

    def stats(self) -> dict[str, Any]: ...

    def card(self) -> dict[str, Any]: ...


def normalize_query(query: str) -> str:
    """Key for exact matching: lowercase, single spaces, no edge quotes or trailing punctuation."""
    q = re.sub(r"\s+", " ", query).strip().lower()
    return q.strip(_QUOTES).rstrip(".,;:!?" + _QUOTES).strip(_QUOTES)


def _rate(n: int, d: int) -> float:
    return n / d if d else 0.0


def _exact_index(pairs: dict[str, str]) -> dict[str, str]:
    """normalized query -> snippet; of queries that normalize alike, the first recorded wins."""
    index: dict[str, str] = {}
    for q, obs in pairs.items():
        index.setdefault(normalize_query(q), obs)
    return index


def _read_str_map(path: Path, what: str) -> dict[str, str] | None:
    """A JSON object of str -> str, or None (with a warning) when the file is corrupt."""
    try:
        data = read_json(path)
        if isinstance(data, dict) and all(isinstance(v, str) for v in data.values()):
            return data
        raise DataFileError(f"{path}: not a JSON object of strings")
    except DataFileError as e:
        warnings.warn(f"{what} cache is corrupt, rebuilding it: {e}", stacklevel=3)
        return None


class _BM25:
    """Best-document lookup over a fixed list of texts (index built once, ~0.2 s per 5k short docs)."""

    def __init__(self, docs: list[str]):
        import bm25s  # heavy import kept out of module import

        self._bm25s = bm25s
        self.index = bm25s.BM25()
        self.index.index(self._tokens(docs), show_progress=False)

    def _tokens(self, texts: list[str]) -> list[list[str]]:
        return self._bm25s.tokenize(texts, stopwords="en", return_ids=False, show_progress=False)

    def best(self, query: str) -> int | None:
        """Index of the best document, or None when no query word occurs anywhere."""
        tokens = self._tokens([query])[0]
        if not tokens:
            return None
        scores = self.index.get_scores(tokens)
        i = int(scores.argmax())  # argmax takes the first of ties: the earliest recorded doc wins
        return i if scores[i] > 0 else None


def _source_files(root: Path) -> list[Path]:
    groups = (("finetune/alpaca_format", "*.json"), ("finetune/gpt_format", "*.jsonl"), ("trajs", "*.json"))
    return [p for folder, pattern in groups for p in sorted(data_file(root, folder).glob(pattern))]


def _texts_of(path: Path) -> list[str]:
    """The ReAct texts of one source file; chat message lists are joined one message per line."""
    if path.suffix == ".jsonl":
        return ["\n".join(m["content"] for m in rec["messages"]) for rec in iter_jsonl(path)]
    data = read_json(path)
    if isinstance(data, list):  # alpaca rows
        return [row["output"] for row in data]
    texts = []
    for ep in data.values():  # eval run: {dev index: {"traj": text | messages | repr(messages)}}
        traj = ep["traj"]
        if isinstance(traj, str) and traj.lstrip().startswith("[{"):
            try:
                traj = ast.literal_eval(traj)
            except (ValueError, SyntaxError):
                pass  # ReAct text that happens to start with a bracket
        texts.append("\n".join(m["content"] for m in traj) if isinstance(traj, list) else traj)
    return texts


def extract_pairs(text: str) -> list[tuple[str, str]]:
    """(query, observation) for every `Action: search[q]` line directly followed by `Observation:`.

    The query runs to the LAST `]` of the line (queries hold nested brackets); a line cut off
    before its `]` (generation hit the token limit) keeps the rest of the line.
    """
    lines = text.split("\n")
    out = []
    for line, nxt in zip(lines, lines[1:], strict=False):
        m, o = _ACTION_RE.match(line.strip()), _OBS_RE.match(nxt.strip())
        if m and o:
            arg = m.group(1)
            query = arg[: arg.rindex("]")] if "]" in arg else arg
            if query.strip():
                out.append((query.strip(), o.group(1).strip()))
    return out


def load_recorded_pairs(data_dir: str | Path | None = None, cache: bool = True) -> dict[str, str]:
    """Recorded query -> snippet from all FireAct trajectories (first seen wins, sorted file order).

    Snippets are kept verbatim, including the ~70 that read "None" (FireAct's tool returned None
    when Google gave neither an answer box nor a snippet): replay must show the agent what it saw.

    Cached under <cache>/search/recorded_<hash>.json, the hash covering the source files' names,
    sizes and mtimes; a corrupt cache is rebuilt with a warning.
    """
    root = resolve_data_dir(data_dir)
    files = _source_files(root)
    if not files:
        raise DataFileError(f"no FireAct trajectories under {root}/finetune and {root}/trajs: {FETCH}")
    sig = "\n".join(f"{p.relative_to(root)}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)
    digest = hashlib.sha256(f"v{_EXTRACT_VERSION}\n{sig}".encode()).hexdigest()[:16]
    path = cache_dir() / "search" / f"recorded_{digest}.json"
    if cache and path.is_file() and (cached := _read_str_map(path, "recorded-search")):
        return cached
    pairs: dict[str, str] = {}
    for p in files:
        for text in _texts_of(p):
            for q, obs in extract_pairs(text):
                pairs.setdefault(q, obs)
    if cache:
        atomic_write_json(path, pairs, indent=None)
    return pairs


class RecordedSearch:
    """Offline replay of FireAct's recorded Google results; see the module docstring."""

    def __init__(self, data_dir: str | Path | None = None, max_chars: int = MAX_OBS_CHARS, cache: bool = True):
        self.max_chars = max_chars
        self.pairs = load_recorded_pairs(data_dir, cache=cache)
        self._exact = _exact_index(self.pairs)
        self._docs = list(self.pairs.items())
        self._bm25: _BM25 | None = None  # built on the first miss: exact hits never pay for it
        self.bm25_build_s = 0.0
        self.calls = self.exact_hits = self.bm25_hits = self.misses = 0

    def __call__(self, query: str) -> str:
        self.calls += 1
        key = normalize_query(query)
        if not key:
            self.misses += 1
            return EMPTY_QUERY
        if key in self._exact:
            self.exact_hits += 1
            return self._exact[key][: self.max_chars]
        if self._bm25 is None:
            t0 = time.perf_counter()
            self._bm25 = _BM25([f"{q} {obs}" for q, obs in self._docs])
            self.bm25_build_s = time.perf_counter() - t0
        i = self._bm25.best(query)
        if i is None:
            self.misses += 1
            return NO_RESULTS
        self.bm25_hits += 1
        return self._docs[i][1][: self.max_chars]

    @property
    def hit_rate(self) -> float:
        """Fraction of calls answered by the recorded result of the same (normalized) query."""
        return _rate(self.exact_hits, self.calls)

    def stats(self) -> dict[str, Any]:
        return {
            "tool": "recorded", "calls": self.calls, "exact_hits": self.exact_hits, "bm25_hits": self.bm25_hits,
            "misses": self.misses, "hit_rate": self.hit_rate, "bm25_rate": _rate(self.bm25_hits, self.calls),
            "recorded_pairs": len(self.pairs),
        }

    def card(self) -> dict[str, Any]:
        return {"search": "recorded", "corpus": f"FireAct's recorded Google results ({len(self.pairs):,} queries)",
                "retriever": "normalized exact match, else BM25 (bm25s) over recorded query + snippet", "k": 1,
                "max_obs_chars": self.max_chars, "noise": "none"}


def extract_serpapi_answer(response_json: dict) -> str:
    """The observation for one SerpAPI Google response.

    Precedence: answer box's direct answer, then its snippet, then the first highlighted word
    of the snippet, then the first organic result that has a snippet.
    """
    box = response_json.get("answer_box") or {}
    if isinstance(box, list):  # SerpAPI occasionally returns several boxes
        box = box[0] if box else {}
    for field in ("answer", "snippet"):
        if isinstance(box.get(field), str) and box[field].strip():
            return box[field].strip()
    words = box.get("snippet_highlighted_words")
    if isinstance(words, list) and words and isinstance(words[0], str):
        return words[0].strip()
    for result in response_json.get("organic_results") or []:
        if isinstance(result, dict) and isinstance(result.get("snippet"), str) and result["snippet"].strip():
            return result["snippet"].strip()
    return NO_RESULTS


class SerpAPISearch:
    """Live Google through SerpAPI; the key comes from $SERPAPI_API_KEY at call time, never stored."""

    def __init__(self, cache_path: str | Path | None = None, max_chars: int = MAX_OBS_CHARS, seed_from_recorded: bool = True,
                 data_dir: str | Path | None = None, endpoint: str = SERPAPI_URL, timeout_s: float = 20.0):
        self.cache_path = Path(cache_path) if cache_path else cache_dir() / "serpapi.json"
        self.max_chars, self.endpoint, self.timeout_s = max_chars, endpoint, timeout_s
        # normalized query -> answer fetched live; a corrupt file starts over (it is only a cache)
        self.cache = (_read_str_map(self.cache_path, "SerpAPI") if self.cache_path.is_file() else None) or {}
        # Recorded results stay in memory only: the file holds just what we paid for.
        self.pairs = load_recorded_pairs(data_dir) if seed_from_recorded else {}
        self._seed = _exact_index(self.pairs)
        self.calls = self.cache_hits = self.api_calls = 0

    def __call__(self, query: str) -> str:
        self.calls += 1
        key = normalize_query(query)
        if not key:
            return EMPTY_QUERY
        answer = self.cache.get(key, self._seed.get(key))
        if answer is not None:
            self.cache_hits += 1
            return answer[: self.max_chars]
        answer = self._fetch(query.strip())
        self.cache[key] = answer
        atomic_write_json(self.cache_path, self.cache)
        return answer[: self.max_chars]

    def _fetch(self, query: str) -> str:
        import requests

        key = os.environ.get("SERPAPI_API_KEY", "")
        if not key:
            raise ToolError(f"query {query!r} is not cached and SERPAPI_API_KEY is not set")
        params = {"engine": "google", "q": query, "google_domain": "google.com", "gl": "us", "hl": "en", "api_key": key}
        self.api_calls += 1
        # Texts from requests hold the request URL, and so the key (raw or URL-encoded): scrub both,
        # and raise `from None` so no chained traceback shows it either.
        def scrub(text: str) -> str:
            return text.replace(key, "***").replace(quote_plus(key), "***")

        try:
            resp = requests.get(self.endpoint, params=params, timeout=self.timeout_s)
        except requests.RequestException as e:
            raise ToolError(f"SerpAPI request failed: {scrub(str(e))}") from None
        if resp.status_code != 200:
            raise ToolError(f"SerpAPI returned HTTP {resp.status_code}: {scrub(resp.text[:200])}")
        try:
            data = resp.json()
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise ToolError("SerpAPI returned a body that is not a JSON object")
        return extract_serpapi_answer(data)

    def stats(self) -> dict[str, Any]:
        return {"tool": "serpapi", "calls": self.calls, "cache_hits": self.cache_hits, "api_calls": self.api_calls,
                "hit_rate": _rate(self.cache_hits, self.calls)}

    def card(self) -> dict[str, Any]:
        return {"search": "serpapi", "corpus": "live Google (SerpAPI), cached", "retriever": "Google answer box, "
                "else first snippet", "k": 1, "max_obs_chars": self.max_chars, "noise": "none"}


class NoisyTool:
    """With probability `rate`, replace the observation by "None" (kind="none") or by another
    observation (kind="random": one of `pool`, e.g. every recorded snippet or every paragraph;
    without a pool, one of the observations seen so far).

    Each decision is drawn from (seed, query, how many times this query came before), not from
    one stream in call order: batched, continuous or one-at-a-time rollouts call the tool in
    different orders, and must still see the same noise."""

    def __init__(self, tool: SearchTool, rate: float, kind: str = "none", seed: int = 0, pool: list[str] | None = None):
        if not 0 <= rate <= 1:
            raise ValueError(f"noise rate must be in [0, 1], got {rate}")
        if kind not in ("none", "random"):
            raise ValueError(f"noise kind must be 'none' or 'random', got {kind!r}")
        self.tool, self.rate, self.kind, self.seed = tool, rate, kind, seed
        self.pool = list(dict.fromkeys(pool or []))  # ordered: deterministic choice
        self.fixed_pool = bool(self.pool)
        self.seen: dict[str, int] = {}
        self.calls = self.corrupted = 0

    def __call__(self, query: str) -> str:
        obs = self.tool(query)  # always call: the wrapped tool's counters stay true
        self.calls += 1
        k = self.seen[query] = self.seen.get(query, -1) + 1
        if not self.fixed_pool and obs not in self.pool:
            self.pool.append(obs)
        rng = random.Random(f"{self.seed}\x00{query}\x00{k}")
        if rng.random() >= self.rate:
            return obs
        self.corrupted += 1
        if self.kind == "none" or len(self.pool) < 2:
            return "None"
        other = obs
        while other == obs:
            other = self.pool[rng.randrange(len(self.pool))]
        return other

    def stats(self) -> dict[str, Any]:
        return {**self.tool.stats(), "noise_kind": self.kind, "noise_rate": self.rate, "noise_calls": self.calls,
                "noise_corrupted": self.corrupted, "noise_observed_rate": _rate(self.corrupted, self.calls)}

    def card(self) -> dict[str, Any]:
        return {**self.tool.card(), "noise": f"{self.rate:g} {self.kind}"}


def noise_pool(tool: SearchTool) -> list[str] | None:
    """Observations a random-noise tool draws from: every recorded snippet, or every paragraph."""
    from .wiki import WikiSearch

    if isinstance(tool, RecordedSearch):
        return [obs[: tool.max_chars] for obs in tool.pairs.values()]
    if isinstance(tool, WikiSearch):
        return [tool.format([i]) for i in range(len(tool.titles))]
    return None


def make_search(params: SearchParams, data_dir: str | Path | None = None, corpus: str | None = None,
                multihop_dir: str | Path | None = None) -> SearchTool:
    """The search tool described by `params` (wrapped in NoisyTool when noise_rate > 0).

    `corpus` (a wiki task's own) makes it Wikipedia search over that corpus, whatever params.kind says."""
    tool: SearchTool
    if corpus or params.kind == "wiki":
        from .wiki import WikiSearch

        if not (corpus or params.corpus):
            raise ValueError("search.kind=wiki needs search.corpus (a multihop corpus name or a JSONL path)")
        tool = WikiSearch(corpus or params.corpus, params.top_k, params.max_obs_chars, multihop_dir)
    elif params.kind == "recorded":
        tool = RecordedSearch(data_dir, max_chars=params.max_obs_chars)
    elif params.kind == "serpapi":
        tool = SerpAPISearch(params.cache_path, max_chars=params.max_obs_chars, data_dir=data_dir)
    else:
        raise ValueError(f"unknown search kind {params.kind!r}")
    if params.noise_rate > 0:
        tool = NoisyTool(tool, params.noise_rate, params.noise_kind, params.seed, noise_pool(tool))
    return tool
