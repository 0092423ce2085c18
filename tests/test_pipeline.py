"""Pipeline stage wiring that needs no model: which fine-tunes the data-scaling sweep trains."""

from pathlib import Path

from fireact_utils import pipeline
from fireact_utils.config import load_params

SMOKE = Path(__file__).resolve().parent.parent / "params" / "smoke.yaml"


def test_scaling_reuses_the_main_fine_tune(tmp_path, data_dir):
    """The sweep's N equal to the main dataset trains nothing new: it points at `finetune/`."""
    p = load_params(SMOKE, [f"output_root={tmp_path}", "study.data_sizes=[4, 8]"])
    assert p.dataset.n_trajectories == 8
    runs = pipeline.scaling_runs(p)  # no main dataset yet: every N gets its own dir
    assert {n: d.name for n, (_, _, d) in runs.items()} == {4: "n4", 8: "n8"}
    main = pipeline.build_dataset(p)  # the released trajectories, first 8 of the seeded mix
    runs = pipeline.scaling_runs(p)
    assert runs[8][2] == p.run_dir / "finetune" and len(runs[8][1]) == len(main) == 8
    assert runs[4][2] == p.run_dir / "scaling" / "n4" and len(runs[4][1]) == 4
    assert runs[4][0].dataset.n_trajectories == 4
