"""Stage and sweep wiring that needs no model: which fine-tunes the data-scaling sweep trains."""

from pathlib import Path

from fireact_utils import pipeline, studies
from fireact_utils.config import load_params

SMOKE = Path(__file__).resolve().parent.parent / "params" / "smoke.yaml"


def test_scaling_reuses_the_main_fine_tune(tmp_path, data_dir):
    """The sweep's N equal to the main dataset trains nothing new: it points at `finetune/`."""
    p = load_params(SMOKE, [f"output_root={tmp_path}", "study.data_sizes=[4, 8]"])
    assert p.dataset.n_trajectories == 8
    runs = studies.scaling_runs(p)  # no main dataset yet: every N gets its own dir
    assert {n: d.name for n, (_, _, d) in runs.items()} == {4: "n4", 8: "n8"}
    main = pipeline.build_dataset(p)  # the released trajectories, first 8 of the seeded mix
    from datasets import load_from_disk

    from fireact_utils.trajectories import to_alpaca, to_chat

    hf = load_from_disk(str(p.run_dir / "dataset" / "hf"))  # also a Hugging Face DatasetDict
    assert hf["alpaca"][0] == to_alpaca(main[0]) and hf["chat"][7] == to_chat(main[7]) and hf.num_rows["chat"] == 8
    runs = studies.scaling_runs(p)
    assert runs[8][2] == p.run_dir / "finetune" and len(runs[8][1]) == len(main) == 8
    assert runs[4][2] == p.run_dir / "scaling" / "n4" and len(runs[4][1]) == 4
    assert runs[4][0].dataset.n_trajectories == 4


def test_scaling_draws_on_generated_trajectories(tmp_path, data_dir):
    """A sweep size above the 500 released trajectories works once generation added more."""
    from fireact_utils.data import load_fireact
    from fireact_utils.io import write_jsonl

    p = load_params(SMOKE, [f"output_root={tmp_path}", "study.data_sizes=[503]", "dataset.n_trajectories=null"])
    released = load_fireact("hotpotqa", data_dir=data_dir)
    assert len(released) == 500
    new = [{**r, "question": f"A new question {i}?", "reward": True, "id": f"gen/{i}"} for i, r in enumerate(released[:3])]
    write_jsonl(p.run_dir / "generate" / "hotpotqa_react.jsonl", new)
    (_, recs, out), = studies.scaling_runs(p).values()
    assert len(recs) == 503 and {r["question"] for r in new} <= {r["question"] for r in recs}
    assert out == p.run_dir / "scaling" / "n503"

