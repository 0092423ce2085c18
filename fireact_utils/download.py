"""Download FireAct's public data files (online machines only) into a data dir.

The layout matches the FireAct repository's `data/` and `trajs/` folders, which is what
`FIREACT_DATA_DIR` expects. Files are written atomically; existing ones are kept.
"""

from __future__ import annotations

import urllib.request
from pathlib import Path

from .io import atomic_write_text

REPO_RAW = "https://raw.githubusercontent.com/anchen1011/FireAct/main/"
FILES = {  # local path -> path in the repository
    "hotpotqa/dev.json": "data/hotpotqa/dev.json",
    "hotpotqa/test.json": "data/hotpotqa/test.json",
    "bamboogle/test.csv": "data/bamboogle/test.csv",
    "strategyqa/strategyqa_dev.json": "data/strategyqa/strategyqa_dev.json",
    "strategyqa/strategyqa_test.json": "data/strategyqa/strategyqa_test.json",
    "strategyqa/strategyqa_train_filtered.json": "data/strategyqa/strategyqa_train_filtered.json",
    **{f"finetune/alpaca_format/{n}.json": f"data/finetune/alpaca_format/{n}.json"
       for n in ("hotpotqa", "hotpotqa_multimethod", "multitask", "multitask_multimethod")},
    **{f"finetune/gpt_format/{n}.jsonl": f"data/finetune/gpt_format/{n}.jsonl"
       for n in ("hotpotqa", "hotpotqa_multimethod", "multitask", "multitask_multimethod")},
}


def download_fireact(dest: str | Path = "data", timeout_s: float = 60.0) -> Path:
    """Fetch the files above into `dest`; raises a clear error when offline."""
    dest = Path(dest)
    for local, remote in FILES.items():
        out = dest / local
        if out.is_file():
            continue
        try:
            with urllib.request.urlopen(REPO_RAW + remote, timeout=timeout_s) as r:
                atomic_write_text(out, r.read().decode("utf-8"))
        except OSError as e:
            raise RuntimeError(f"could not download {remote} ({e}); offline? copy the data and set FIREACT_DATA_DIR") from e
    return dest
