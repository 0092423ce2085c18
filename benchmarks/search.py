"""Wiki search speed on the HotpotQA corpus (10,708 paragraphs): index build, cache load, and the
latency of one tool call, side by side with bm25s' own `retrieve` on the same index.

    python benchmarks/search.py                 # 793 questions + 793 agent-style queries, 3 passes

Queries: every HotpotQA-wiki question (long) and, as agent-style queries (short), the first
recorded FireAct search queries. "tool call" is what the agent pays: tokenize, score every
paragraph, take the best, format the observation. Needs $FIREACT_MULTIHOP_DIR (and
$FIREACT_DATA_DIR for the recorded queries; without it only the questions are timed).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--passes", type=int, default=3, help="times every query is timed")
    args = ap.parse_args()
    os.environ["FIREACT_CACHE"] = tempfile.mkdtemp(prefix="fireact-bench-")  # a cold cache: the build is timed

    import bm25s

    from fireact_utils.tasks import load_task
    from fireact_utils.wiki import WikiSearch, _tokenize

    t0 = time.perf_counter()
    tool = WikiSearch("hotpotqa")
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    tool = WikiSearch("hotpotqa")
    load_s = time.perf_counter() - t0

    questions = [q for s in ("train", "val", "test") for q in load_task("hotpotqa-wiki", s).questions]
    queries = {"questions": questions}
    try:
        from fireact_utils.tools import load_recorded_pairs

        queries["agent queries"] = list(load_recorded_pairs(cache=False))[: len(questions)]
    except (FileNotFoundError, ValueError) as e:
        print(f"(no recorded queries: {e})")

    def timed(fn, qs: list[str]) -> np.ndarray:
        out = []
        for _ in range(args.passes):
            for q in qs:
                t = time.perf_counter()
                fn(q)
                out.append(time.perf_counter() - t)
        return np.asarray(out) * 1000

    def library(q: str):  # what a user of bm25s would write
        return tool.index.retrieve([_tokenize([q])[0] or ["_"]], k=1, show_progress=False)

    print(f"HotpotQA corpus: {len(tool.titles):,} paragraphs; index build {build_s:.2f} s, "
          f"load from cache {load_s:.2f} s (bm25s {bm25s.__version__})")
    print(f"{'queries':<15}{'n':>6}  {'path':<20}{'p50 ms':>8}{'p99 ms':>8}{'mean ms':>9}")
    for name, qs in queries.items():
        for path, fn in (("tool call (ours)", tool), ("bm25s.retrieve k=1", library)):
            ms = timed(fn, qs)
            print(f"{name:<15}{len(qs):>6}  {path:<20}{np.percentile(ms, 50):>8.2f}{np.percentile(ms, 99):>8.2f}"
                  f"{ms.mean():>9.2f}")


if __name__ == "__main__":
    main()
