"""The offline Wikipedia environment: BM25 over real paragraphs, and how faithful each episode's search was.

The recorded-Google replay answers most agent queries with the result of a *different* query.
Here every query is answered from the actual Wikipedia paragraphs of the multihop data
(`$FIREACT_MULTIHOP_DIR`, e.g. ../shared/multihop: HotpotQA, 2WikiMultihopQA, StrategyQA), each
question's gold paragraphs among everyone else's, so a result can be checked against the gold:

    tool = WikiSearch("hotpotqa")                 # a corpus name, or any JSONL of {title, text}
    tool("Kiss and Tell 1945 film")               # 'Kiss and Tell (1945 film): Kiss and Tell is a ...'
    evidence(record, gold_titles, tool)           # did this episode's searches surface the gold?
    fidelity(records, task, tool)                 # gold-top rate, saw-all-gold rate, outcome counts

The BM25 index is built once per corpus and cached under `<cache>/wiki/`, keyed by the corpus
file's content hash, so an edited corpus gets a fresh index. Shortcuts: bm25s' tokenizer with
English stopwords and no stemmer; an observation is cut on a word boundary, each of k paragraphs
getting an equal share of `max_chars`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
import warnings
from collections.abc import Container, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from .config import SearchParams, cache_dir, data_file, default
from .config import multihop_dir as resolve_multihop_dir
from .io import DataFileError
from .tools import EMPTY_QUERY, MAX_OBS_CHARS, NO_RESULTS

CORPORA = ("hotpotqa", "2wikimultihopqa", "strategyqa")  # folders of the multihop data
OUTCOMES = ("correct", "saw evidence, wrong answer", "missed evidence", "never finished")


def corpus_path(corpus: str | Path, multihop_dir: str | Path | None = None) -> Path:
    """A corpus name (see CORPORA) in the multihop data, or the path of a {title, text} JSONL."""
    if str(corpus) in CORPORA:
        return data_file(resolve_multihop_dir(multihop_dir), f"{corpus}/corpus.jsonl")
    path = Path(corpus).expanduser()
    if not path.is_file():
        raise DataFileError(f"corpus not found: {corpus} (a name: {', '.join(CORPORA)}; or a JSONL of {{title, text}})")
    return path


def read_corpus(path: Path) -> tuple[list[str], list[str]]:
    """Titles and texts, one paragraph per line; a bad line is an error naming file and line."""
    titles, texts = [], []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError as e:
                raise DataFileError(f"{path} line {n}: malformed JSON ({e})") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("title"), str) or not isinstance(rec.get("text"), str):
                raise DataFileError(f"{path} line {n}: a paragraph needs string 'title' and 'text' fields")
            titles.append(rec["title"])
            texts.append(rec["text"])
    if not titles:
        raise DataFileError(f"corpus {path} has no paragraphs")
    return titles, texts


def cut_words(text: str, n: int) -> str:
    """`text` cut to at most n characters, at the last space before the limit when there is one."""
    if len(text) <= n:
        return text
    cut = text.rfind(" ", 0, n + 1)
    return text[: cut if cut > 0 else n].rstrip()


def _tokenize(texts: list[str]) -> list[list[str]]:
    import bm25s

    return bm25s.tokenize(texts, stopwords="en", return_ids=False, show_progress=False)


class WikiSearch:
    """BM25 search over Wikipedia paragraphs; the observation is the top k as 'title: text'."""

    def __init__(self, corpus: str | Path, top_k: int = default(SearchParams, "top_k"), max_chars: int = MAX_OBS_CHARS,
                 multihop_dir: str | Path | None = None, cache: bool = True):
        self.name = str(corpus)
        self.path = corpus_path(corpus, multihop_dir)
        self.top_k, self.max_chars = top_k, max_chars
        raw = self.path.read_bytes()
        self.digest = hashlib.sha256(raw).hexdigest()[:16]
        self.titles, self.texts = read_corpus(self.path)
        t0 = time.perf_counter()
        self.index = self._load_or_build(cache_dir() / "wiki" / f"{self.path.parent.name}-{self.digest}", cache)
        self.load_s = time.perf_counter() - t0
        self.calls = self.empty = self.misses = 0

    def _load_or_build(self, where: Path, cache: bool):
        import bm25s

        if cache and (where / "done").is_file():
            try:
                return bm25s.BM25.load(str(where), show_progress=False)
            except Exception as e:  # noqa: BLE001 - only a cache: rebuild it
                warnings.warn(f"wiki index cache {where} is unreadable, rebuilding it: {e}", stacklevel=3)
        index = bm25s.BM25()
        index.index(_tokenize([f"{t} {x}" for t, x in zip(self.titles, self.texts, strict=True)]), show_progress=False)
        if cache:  # built beside, then renamed: a killed build never leaves a half-written index
            tmp = where.with_name(f"{where.name}.tmp{os.getpid()}")
            index.save(str(tmp), show_progress=False)
            (tmp / "done").write_text(self.path.name)
            shutil.rmtree(where, ignore_errors=True)
            try:
                os.replace(tmp, where)
            except OSError:  # another process (a test worker) published the same index meanwhile
                shutil.rmtree(tmp, ignore_errors=True)
        return index

    def retrieve(self, query: str, k: int | None = None) -> list[int]:
        """Indices of the best k paragraphs with a positive score, best first (ties: corpus order)."""
        tokens = _tokenize([query])[0]
        if not tokens:
            return []
        scores = self.index.get_scores(tokens)
        k = k or self.top_k
        best = [int(scores.argmax())] if k == 1 else np.argsort(-scores, kind="stable")[:k].tolist()
        return [i for i in best if scores[i] > 0]

    def format(self, hits: list[int]) -> str:
        """The observation for retrieved paragraphs (what the agent reads)."""
        if not hits:
            return NO_RESULTS
        share = self.max_chars // len(hits)
        parts = [cut_words(f"{self.titles[i]}: {self.texts[i]}", share) for i in hits]
        return parts[0] if len(parts) == 1 else " ".join(f"[{j}] {p}" for j, p in enumerate(parts, 1))

    def observe(self, query: str) -> tuple[list[int], str]:
        """The paragraphs a query retrieves and the observation the agent reads (counts nothing)."""
        if not query.strip():
            return [], EMPTY_QUERY
        hits = self.retrieve(query)
        return hits, self.format(hits)

    def __call__(self, query: str) -> str:
        hits, obs = self.observe(query)
        self.calls += 1
        self.empty += obs == EMPTY_QUERY
        self.misses += obs == NO_RESULTS
        return obs

    def stats(self) -> dict[str, Any]:
        return {"tool": "wiki", "calls": self.calls, "empty_queries": self.empty, "misses": self.misses}

    def card(self) -> dict[str, Any]:
        return {"search": "wiki", "corpus": f"{self.name} ({len(self.titles):,} paragraphs)",
                "retriever": "BM25 (bm25s, English stopwords, no stemmer)", "k": self.top_k,
                "max_obs_chars": self.max_chars, "noise": "none"}


# ---------------------------------------------------------------- fidelity


def shown_titles(observation: str, titles: Iterable[str]) -> set[str]:
    """Which of `titles` head a paragraph of `observation`, read off its text (the inverse of
    `WikiSearch.format`: 'title: text', or '[j] title: text' for each of k > 1 paragraphs). The one
    rule for "this observation holds that paragraph": `evidence` applies it to replayed observations,
    `failures.failure_class` to a record's own, which needs no index."""
    return {t for t in titles if re.match(rf"(?:.*?\[\d+\] )?{re.escape(t)}: ", observation, re.S)}


def retrieved_titles(observation: str, titles: Container[str]) -> list[str]:
    """The titles of every paragraph in `observation`, in order (the inverse of `WikiSearch.format`);
    `titles` (the corpus's) tells where a title ends, since titles hold ': ' too ('Star Wars: ...').
    The longest prefix that is a title wins; an observation that is no paragraph ('None') has none."""
    parts, j = [observation], 2
    if observation.startswith("[1] "):
        parts = [observation[4:]]
        while (cut := parts[-1].find(f" [{j}] ")) >= 0:
            parts[-1:] = [parts[-1][:cut], parts[-1][cut + len(f" [{j}] "):]]
            j += 1
    found = ([part[:m.start()] for m in re.finditer(": ", part) if part[:m.start()] in titles][-1:] for part in parts)
    return [t for hit in found for t in hit]


def evidence(record: dict, gold: list[str], tool: WikiSearch) -> dict[str, Any]:
    """What one episode's searches surfaced of its gold paragraphs.

    Each search is replayed (retrieval is deterministic): a step whose observation is not what
    the tool returns for its query was corrupted by a noisy tool, and counts as showing nothing.
    """
    gold_set, seen, top_gold, searches = set(gold), set(), 0, 0
    for step in record["steps"]:
        if step["action"] != "search":
            continue
        searches += 1
        hits, obs = tool.observe(step["arg"])
        if step["observation"] != obs:
            continue
        titles = [tool.titles[i] for i in hits]
        top_gold += bool(titles) and titles[0] in gold_set
        seen |= shown_titles(obs, gold_set)
    return {"searches": searches, "gold_top": top_gold, "saw_any_gold": bool(seen),
            "saw_all_gold": bool(gold_set) and seen == gold_set}


def outcome(record: dict, ev: dict) -> str:
    """Correct, or why not: never finished / finished without all the evidence / had it and erred."""
    if record["em"]:
        return "correct"
    if record["status"] != "finished":
        return "never finished"
    return "saw evidence, wrong answer" if ev["saw_all_gold"] else "missed evidence"


def fidelity(records: list[dict], gold_titles: list[list[str]], tool: WikiSearch) -> dict[str, Any]:
    """Environment fidelity of a condition: the share of searches whose top paragraph is gold for
    the question, the shares of episodes that saw any / every gold paragraph, and outcome counts."""
    evs = [evidence(r, gold_titles[r["idx"]], tool) for r in records]
    n, searches = len(records) or 1, sum(e["searches"] for e in evs)
    counts = dict.fromkeys(OUTCOMES, 0)
    for r, e in zip(records, evs, strict=True):
        counts[outcome(r, e)] += 1
    return {"searches": searches, "gold_top_rate": sum(e["gold_top"] for e in evs) / searches if searches else 0.0,
            "saw_any_gold_rate": sum(e["saw_any_gold"] for e in evs) / n,
            "saw_all_gold_rate": sum(e["saw_all_gold"] for e in evs) / n,
            "outcomes": counts}
