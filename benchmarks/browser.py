"""The episode browser's page size and build time on real episodes: FireAct's three released
HotpotQA dev-500 runs (GPT-3.5 fine-tuned, Llama-2-13B and 7B LoRA; 1,464 ReAct episodes) as the
kit's episode records, in a run dir of their own, repeated to --conditions conditions.

    python benchmarks/browser.py                    # 3 conditions, then 10 (the released ones repeated)
    python benchmarks/browser.py --conditions 3     # only the released runs

Each record is what the agent loop writes (`agent.Agent.record`): the id of its dev question, the
steps parsed from the released trajectory, the answer of its finish action scored by the task.
Repeated conditions are copies under other names: the page grows with episodes, not with their
variety. Needs $FIREACT_DATA_DIR (its trajs/); the pages are left in a temp dir, printed.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

NAMES = {"gpt-3.5": "released_gpt35_ft", "13b": "released_llama13b_lora", "7b": "released_llama7b_lora"}


def released_conditions() -> dict[str, list[dict]]:
    """FireAct's released runs as episode records, by condition name."""
    from fireact_utils.agent import episode_id
    from fireact_utils.config import data_dir
    from fireact_utils.io import read_json
    from fireact_utils.tasks import load_task
    from fireact_utils.trajectories import parse_chat, parse_react_text

    task = load_task("hotpotqa", "dev")
    conds = {}
    for f in sorted((data_dir() / "trajs").glob("*.json")):
        recs = []
        for key, v in read_json(f).items():
            idx, t = int(key), v["traj"]
            steps = parse_chat(t)[1] if isinstance(t, list) else parse_react_text(t.split("### Response:\n", 1)[1])[1]
            answer = next((s["arg"] for s in reversed(steps) if s["action"] == "finish"), None)
            score = task.evaluate(idx, answer)
            recs.append({"id": episode_id(task, idx), "idx": idx, "question": task.questions[idx], "gold": task.answers[idx],
                         "method": "react", "steps": steps, "answer": answer, "task": task.name, "split": task.split,
                         "status": "finished" if answer is not None else "max_turns", "turns": len(steps),
                         "em": bool(score["em"] and answer is not None), "f1": float(score["f1"]) if answer else 0.0,
                         "pred": score["pred"], "gt": score["gt"]})
        conds[next(n for k, n in NAMES.items() if k in f.name)] = recs
    return conds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--conditions", type=int, nargs="+", default=[3, 10], help="conditions in each page")
    args = ap.parse_args()

    from fireact_utils import browser
    from fireact_utils.io import write_jsonl

    released = list(released_conditions().items())
    for n in args.conditions:
        run = Path(tempfile.mkdtemp(prefix="fireact-browser-")) / "released"
        for k in range(n):
            name, recs = released[k % len(released)]
            write_jsonl(run / "eval" / f"{name}{'' if k < len(released) else f'_copy{k // len(released)}'}.jsonl", recs)
        episodes = sum(len(released[k % len(released)][1]) for k in range(n))
        t0 = time.perf_counter()
        page = browser.write(run)
        print(f"{n} conditions, {episodes} episodes ({sum(f.stat().st_size for f in (run / 'eval').iterdir()) / 1e6:.1f} MB "
              f"of records): page {page.stat().st_size / 1e6:.1f} MB in {time.perf_counter() - t0:.1f} s  {page}")


if __name__ == "__main__":
    main()
