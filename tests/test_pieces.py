"""A study in pieces (`pieces`): bundles that travel without weights, a merge that refuses what
does not belong together, and (slow) three pieces run as three machines would, through submitit's local
executor, merged into the same tables as the whole study run in one process.
"""

import json
import shutil
import tarfile
from pathlib import Path

import pandas as pd
import pytest

from fireact_utils import headline, keys, pieces
from fireact_utils.config import load_params
from fireact_utils.io import atomic_write_json, write_jsonl

SMOKE = Path(__file__).resolve().parent.parent / "params" / "smoke.yaml"
# the smoke headline cut to three pieces: the base model's greedy and sampled evaluations and one
# training seed, 2 questions everywhere
SMALL = ["study.seeds=[42]", "study.transfer_tasks=[2wikimultihopqa]", "study.generalization_n=2",
         "evaluate.n_questions=2", "study.sc_n=2"]


def _fake_piece(p, name: str, conditions: dict[str, list[dict]]) -> Path:
    """A piece's run dir as a piece leaves it (episodes, a fine-tune's record and its weights), bundled."""
    q = pieces.piece_params(p, name)
    for cond, recs in conditions.items():
        write_jsonl(q.run_dir / "eval" / f"{cond}.jsonl", recs)
    final = q.run_dir / "finetune" / "final"
    atomic_write_json(final / "train_done.json", {"n_examples": 2})
    (final / "model.safetensors").write_bytes(b"weights")
    (q.run_dir / "finetune" / "checkpoint-1").mkdir(parents=True)
    (q.run_dir / "finetune" / "checkpoint-1" / "trainer_state.json").write_text("{}")
    return pieces.write_bundle(q, name, 1.0, q.run_dir.parent)


def test_a_bundle_holds_records_not_weights(tmp_path):
    p = load_params(SMOKE, [f"output_root={tmp_path}"])
    b = _fake_piece(p, "baselines", {"base_fewshot_io": [{"id": "q1", "em": True}]})
    with tarfile.open(b) as tar:
        names = set(tar.getnames())
    assert {"eval/base_fewshot_io.jsonl", "finetune/final/train_done.json", "bundle.json"} <= names
    assert not any(n.endswith(".safetensors") or "checkpoint-" in n for n in names)
    record, _ = pieces.read_bundle(b)
    assert record["piece"] == "baselines" and record["study_key"] == pieces.study_key(p)
    assert record["machine"] and record["commit"] and record["torch"]


def test_merge_refuses_what_does_not_belong_together(tmp_path):
    p = load_params(SMOKE, [f"output_root={tmp_path}"])
    a = _fake_piece(p, "baselines", {"base_fewshot_io": [{"id": "q1", "em": True}]})
    b = _fake_piece(p, "seed-42", {"finetuned_react": [{"id": "q1", "em": False}]})
    other = load_params(SMOKE, [f"output_root={tmp_path / 'other'}", "agent.max_turns=4"])
    c = _fake_piece(other, "seed-7", {"finetuned_react_seed7": [{"id": "q1", "em": False}]})
    merged = load_params(SMOKE, [f"output_root={tmp_path / 'merged'}"])
    with pytest.raises(ValueError, match=r"piece seed-7\) was made with other settings \(agent.max_turns 4 -> 3\)"):
        pieces.merge(merged, [a, b, c])
    with pytest.raises(ValueError, match="piece baselines given twice"):
        pieces.merge(merged, [a, a])
    clash = _fake_piece(p, "seed-7", {"base_fewshot_io": [{"id": "q1", "em": False}]})
    with pytest.raises(ValueError, match=r"eval/base_fewshot_io.jsonl differs between .* two pieces made one output"):
        pieces.merge(merged, [a, clash])
    (tmp_path / "junk.tar.gz").write_bytes(b"not a bundle")
    with pytest.raises(ValueError, match="junk.tar.gz: not a readable bundle"):
        pieces.merge(merged, [tmp_path / "junk.tar.gz"])
    with pytest.raises(ValueError, match="missing: fewshot-votes, seed-7"):  # unpacked, no tables from a partial study
        pieces.merge(merged, [a, b])
    assert (merged.run_dir / "eval" / "finetuned_react.jsonl").is_file()
    assert (merged.run_dir / "pieces" / "seed-42" / "bundle.json").is_file()


def test_every_piece_is_listed_and_named(tmp_path):
    p = load_params(SMOKE, [f"output_root={tmp_path}"])
    assert [x.name for x in pieces.pieces(p)] == ["baselines", "fewshot-votes", "seed-42", "seed-7"]
    with pytest.raises(ValueError, match="no piece 'seed-3' in headline of smoke: pieces are baselines, fewshot-votes, "
                                         "seed-42, seed-7"):
        pieces.run_piece(p, "seed-3")
    bm = load_params("params/base_models.yaml")
    assert [x.name for x in pieces.pieces(bm)] == [f"model-{m}-{r}" for m in ("smollm2-135m", "gemma3-270m")
                                                   for r in ("fewshot", "lr5e-5_2ep", "lr5e-5_3ep", "lr1e-4_2ep", "lr1e-4_3ep")]


def _tables(run: Path) -> dict[str, pd.DataFrame]:
    """The study's tables without what differs between two runs of the same episodes: seconds, machines."""
    drop = ("second", "machine", "wall", "per_s")
    tables = {f.name: pd.read_csv(f) for f in sorted((run / "tables").glob("*.csv"))}
    return {name: t[[c for c in t if not any(d in c for d in drop)]] for name, t in tables.items()}


@pytest.mark.slow
def test_pieces_on_three_machines_merge_into_the_whole_studys_tables(tmp_path, data_dir, multihop_dir, model_path,
                                                                       one_thread):
    """The pieces run as submitit's local jobs (three processes, three output roots: three machines),
    their bundles merge into the tables the whole study gives in one process. A tiny real model
    (random weights: the plumbing, not the numbers) keeps it to minutes; one thread each, so the
    sampled episodes draw the same tokens in every process."""
    from tiny import tiny_llama

    tiny = tiny_llama(tmp_path / "tiny", model_path, 0)
    small = [*SMALL, f"model.name={tiny}", "model.device=cpu", "agent.max_new_tokens=16"]
    ov = [f"output_root={tmp_path / 'pieces'}", *small]
    names = ["baselines", "fewshot-votes", "seed-42"]
    jobs = pieces.submit(str(SMOKE), ov, names, tmp_path / "submitit", cluster="local")
    bundles = [Path(j.result()) for j in jobs]
    assert [pieces.read_bundle(b)[0]["piece"] for b in bundles] == names
    assert sum(b.stat().st_size for b in bundles) < 2**20
    merged = load_params(SMOKE, [f"output_root={tmp_path / 'merged'}", *small])
    out = pieces.merge(merged, bundles)
    assert not list(out.rglob("*.safetensors"))  # the tables came from episodes alone

    whole = load_params(SMOKE, [f"output_root={tmp_path / 'whole'}", *small])
    with keys.saved_only(), pytest.raises(ValueError, match="no merged bundle holds this fine-tune"):
        headline.report(whole, progress=False)  # nothing saved: a merge would not train
    headline.report(whole, progress=False)
    got, want = _tables(out), _tables(whole.run_dir)
    assert set(got) == set(want) >= {"main.csv", "headline_transfer.csv", "self_consistency.csv"}
    for name in want:
        pd.testing.assert_frame_equal(got[name], want[name], check_dtype=False, obj=name)


def test_the_choices_on_validation_in_pieces_choose_as_one_run(tmp_path, model_path, multihop_dir, one_thread):
    """`select` as pieces (the few-shot prompts; each recipe's fine-tune on val) in their own output
    roots, merged: the same selection tables and choices as `select` in one process (tiny model)."""
    from tiny import tiny_llama

    tiny = tiny_llama(tmp_path / "tiny", model_path, 0)
    ov = [f"model.name={tiny}", "model.device=cpu", "study.select_n=2", "agent.max_turns=1", "agent.max_new_tokens=6",
          "study.fewshot_variants={one: {agent.n_exemplars: 1}, two: {agent.n_exemplars: 2}}",
          "study.recipes={a: {train.learning_rate: 0.0001}, b: {train.learning_rate: 0.0003}}",
          "train.max_steps=1", "train.max_length=128", "dataset.n_trajectories=4"]
    p = load_params(SMOKE, [f"output_root={tmp_path / 'pieces'}", *ov])
    names = [x.name for x in pieces.pieces(p, "select")]
    assert names == ["fewshot-variants", "recipe-a", "recipe-b"]
    bundles = [pieces.run_piece(p, n, bundle_dir=tmp_path / "bundles", study="select") for n in names]
    merged = load_params(SMOKE, [f"output_root={tmp_path / 'merged'}", *ov])
    with pytest.raises(ValueError, match="missing: recipe-b"):
        pieces.merge(merged, bundles[:2])
    shutil.rmtree(merged.run_dir)
    out = pieces.merge(merged, bundles)
    whole = load_params(SMOKE, [f"output_root={tmp_path / 'whole'}", *ov])
    from fireact_utils import recipes

    recipes.selections(whole, progress=False)
    for which in ("fewshot_variants", "recipes"):
        got, want = (pd.read_csv(d / "tables" / f"{which}_selection.csv") for d in (out, whole.run_dir))
        same = [c for c in want if not any(x in c for x in ("second", "machine", "wall", "per_s"))]
        pd.testing.assert_frame_equal(got[same], want[same], check_dtype=False, obj=which)
        chosen = [json.loads((d / "tables" / f"{which}_chosen.json").read_text())["label"] for d in (out, whole.run_dir)]
        assert chosen[0] == chosen[1]


def _votes(tiny: Path) -> list[str]:
    """The consistency study on a tiny model: two seeds' fine-tuned agents, each sampled twice on 2 questions."""
    return [f"model.name={tiny}", "model.device=cpu", "study.seeds=[42, 7]", "study.sc_agents=[finetuned]",
            "study.sc_ks=[1, 2]", "study.sc_n=2", "agent.max_turns=1", "agent.max_new_tokens=6",
            "train.max_steps=1", "train.max_length=128", "dataset.n_trajectories=4"]


def tiny_llama_at(tmp_path: Path, model_path: str) -> Path:
    """A tiny real model (`tiny.tiny_llama`) at <tmp>/tiny."""
    from tiny import tiny_llama

    return tiny_llama(tmp_path / "tiny", model_path, 0)


def test_the_vote_over_seeds_in_pieces_gives_its_curve(tmp_path, model_path, one_thread):
    """`consistency` as pieces (each seed's agent trained and sampled in one), merged with no model:
    a curve per seed and their mean at each k (tiny model, 2 seeds, 2 questions, k = 1, 2). That the
    vote's pieces give one process's numbers is the headline's slow test (fewshot-votes, seed-42)."""
    ov = _votes(tiny_llama_at(tmp_path, model_path))
    p = load_params(SMOKE, [f"output_root={tmp_path / 'pieces'}", *ov])
    names = [x.name for x in pieces.pieces(p, "consistency")]
    assert names == ["votes-finetuned", "votes-finetuned_seed7"]
    bundles = [pieces.run_piece(p, n, bundle_dir=tmp_path / "bundles", study="consistency") for n in names]
    out = pieces.merge(load_params(SMOKE, [f"output_root={tmp_path / 'merged'}", *ov]), bundles)
    assert not list(out.rglob("*.safetensors"))
    curve = pd.read_csv(out / "tables" / "self_consistency.csv")
    assert len(curve) == 3 * 2 and (curve["n"] == 2).all()  # two seeds and their mean, k = 1 and 2
    assert sorted(set(curve["k"])) == [1, 2] and curve["em"].between(0, 1).all()


def test_a_piece_cut_short_resumes_from_its_partial_bundle_elsewhere(tmp_path, monkeypatch):
    """A piece stopped halfway bundles what it saved (--partial); run on another machine (another
    output root) with that bundle dir, it starts from those files, and its final bundle adds the
    seconds and names both machines' runs. A partial bundle is never merged as a finished piece."""
    p = load_params(SMOKE, [f"output_root={tmp_path / 'a'}"])
    ran = []

    def run(q):  # a piece of two conditions: the first saved by the earlier run is not redone
        ran.append(sorted(f.name for f in (q.run_dir / "eval").glob("*.jsonl")) if (q.run_dir / "eval").is_dir() else [])
        for cond in ("one", "two"):
            if not (q.run_dir / "eval" / f"{cond}.jsonl").is_file():
                write_jsonl(q.run_dir / "eval" / f"{cond}.jsonl", [{"id": "q1", "em": True}])
                if cond == "one" and len(ran) == 1:
                    return  # cut short after the first

    monkeypatch.setitem(pieces.STUDIES, "toy", (lambda p: [pieces.Piece("only", "a toy piece", run)], lambda p: None))
    bundles = tmp_path / "bundles"
    pieces.run_piece(p, "only", bundle_dir=bundles, study="toy")  # the first machine: cut short...
    (bundles / "smoke-only.tar.gz").unlink()
    part = pieces.run_piece(p, "only", bundle_dir=bundles, study="toy", partial=True)  # ...and bundled as it is
    assert part.name == "smoke-only.partial.tar.gz" and pieces.read_bundle(part)[0]["partial"]
    with pytest.raises(ValueError, match="only partly run"):
        pieces.merge(load_params(SMOKE, [f"output_root={tmp_path / 'm'}"]), [part])
    other = load_params(SMOKE, [f"output_root={tmp_path / 'b'}"])  # the second machine
    done = pieces.run_piece(other, "only", bundle_dir=bundles, study="toy")
    assert ran[-1] == ["one.jsonl"]  # it began from the partial bundle's episodes
    record, files = pieces.read_bundle(done)
    assert {"eval/one.jsonl", "eval/two.jsonl"} <= set(files) and not record["partial"]
    assert len(record["earlier"]) == 1 and record["seconds"] >= record["earlier"][0]["seconds"]
    assert not part.exists()  # the finished bundle replaces it


class _Cut(BaseException):
    """The slot ending mid-piece (a kill): no `except Exception` of the kit catches it."""


def test_a_cut_piece_trains_its_model_again_and_keeps_the_samples_it_saved(tmp_path, model_path, one_thread,
                                                                           monkeypatch):
    """A piece that trains a model, cut after its first sample and bundled partial, goes on on another
    machine (another output root, no weights): it trains the model again, to the same weights on the
    same kind of machine, so the saved sample's episodes count (their key holds the weights) and only
    the second sample runs."""
    from fireact_utils import self_consistency
    from fireact_utils.io import read_json
    from fireact_utils.train import adapter_model_params

    ov = _votes(tiny_llama_at(tmp_path, model_path))
    real = self_consistency.run_condition

    def cut_before_second_sample(p, name, *a, **k):
        if name.endswith("_s1"):
            raise _Cut
        return real(p, name, *a, **k)

    bundles, first = tmp_path / "bundles", load_params(SMOKE, [f"output_root={tmp_path / 'a'}", *ov])
    monkeypatch.setattr(self_consistency, "run_condition", cut_before_second_sample)
    with pytest.raises(_Cut):
        pieces.run_piece(first, "votes-finetuned", bundle_dir=bundles, study="consistency")
    monkeypatch.setattr(self_consistency, "run_condition", real)
    part = pieces.run_piece(first, "votes-finetuned", bundle_dir=bundles, study="consistency", partial=True)
    assert "eval/sc_finetuned_s0.jsonl" in pieces.read_bundle(part)[1]
    assert not any(name.endswith(".safetensors") for name in pieces.read_bundle(part)[1])

    second = load_params(SMOKE, [f"output_root={tmp_path / 'b'}", *ov])
    done = pieces.run_piece(second, "votes-finetuned", bundle_dir=bundles, study="consistency")
    runs = [pieces.piece_params(q, "votes-finetuned").run_dir for q in (first, second)]
    weights = [keys.weights_fingerprint(adapter_model_params(first.model, r / "finetune" / "final")) for r in runs]
    assert weights[0] is not None and weights[0] == weights[1]  # trained twice, the same weights
    metas = [read_json(runs[1] / "eval" / f"sc_finetuned_s{j}.meta.json") for j in (0, 1)]
    assert metas[0]["episodes_run"] == 2 and metas[1]["episodes_run"] == 2  # s0 resumed as saved, s1 ran here
    assert metas[0]["model_fingerprint"] == metas[1]["model_fingerprint"]
    record = pieces.read_bundle(done)[0]
    assert not record["partial"] and len(record["earlier"]) == 1


def test_a_piece_stopped_at_its_deadline_is_bundled_partial_and_goes_on(tmp_path, model_path, capsys):
    """`piece --minutes`: the CLI runs the piece in a child process; at the deadline it stops it,
    bundles what it saved as partial with the seconds it ran, and exits 3; the same command with
    time enough goes on from that bundle and writes the finished one."""
    from fireact_utils.cli import main

    bundles = tmp_path / "bundles"
    argv = ["piece", str(SMOKE), "votes-finetuned", "--study", "consistency", "--bundle-dir", str(bundles),
            f"output_root={tmp_path / 'out'}", *_votes(tiny_llama_at(tmp_path, model_path))]
    assert main([*argv, "--minutes", "0.02"]) == pieces.CUT  # 1.2 s: stopped while it starts
    part = bundles / "smoke-votes-finetuned.partial.tar.gz"
    record = pieces.read_bundle(part)[0]
    assert record["partial"] and 1.2 <= record["seconds"] < 120
    assert "stopped at 0.02 min: partial bundle" in capsys.readouterr().out
    assert main([*argv, "--minutes", "20"]) == 0
    record, files = pieces.read_bundle(bundles / "smoke-votes-finetuned.tar.gz")
    assert not record["partial"] and len(record["earlier"]) == 1 and not part.exists()
    assert {"eval/sc_finetuned_s0.jsonl", "eval/sc_finetuned_s1.jsonl"} <= set(files)
