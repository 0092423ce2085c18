"""The downloader against a real loopback HTTP server: a fresh dir gets the manifest's bytes, a
connection dropped halfway is resumed (or restarted) by the next run, and a file that differs
from the manifest is one error line naming it. Files are served in FireAct's repository layout
(`data/...`, `trajs/...`), so the path mapping is tested too. Nothing leaves 127.0.0.1."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from servers import FileServer, downloaded_data

from fireact_utils import download as dl
from fireact_utils.cli import main

FILES = {  # set -> relative path -> content (the trajs file is long enough to be cut halfway)
    "fireact": {"bamboogle/test.csv": b"Question,Answer\nWho?,Me\n",
                "mmlu/dev/x_dev.csv": b"q,a,b,c,d,A\n",
                "trajs/run.json": b'{"0": {"em": 1}}' + b" " * 50_000 + b"\n"},
    "multihop": {"hotpotqa/questions.jsonl": b'{"id": "1", "question": "q"}\n'},
}


@pytest.fixture
def served(tmp_path: Path) -> tuple[Path, dl.Manifest]:
    """A served tree (fire/ in FireAct's repository layout, hop/ flat), and its manifest, built from
    reference folders with the kit's own `write_manifest`."""
    for name, files in FILES.items():
        for rel, body in files.items():
            for path in (tmp_path / "ref" / name / rel, tmp_path / "www" / ("fire" if name == "fireact" else "hop")
                         / dl.remote_path(name, rel)):
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(body)
    out = dl.write_manifest({n: tmp_path / "ref" / n for n in FILES}, tmp_path / "manifest.json")
    return tmp_path / "www", dl.load_manifest(out)


def _dirs(tmp_path: Path) -> dict[str, Path]:
    return {"fireact": tmp_path / "data", "multihop": tmp_path / "data" / "multihop"}


def _urls(base: str) -> dict[str, str | None]:
    return {"fireact": base + "fire", "multihop": base + "hop/"}


def test_manifest_lists_every_file_of_the_data_dirs(data_dir, multihop_dir):
    """The committed manifest is what the reference copies hold, file for file."""
    manifest = dl.load_manifest()
    assert manifest["fireact"] == dl.scan(data_dir, (multihop_dir,)) and manifest["multihop"] == dl.scan(multihop_dir)
    assert {"trajs", "mmlu", "finetune", "hotpotqa"} <= {rel.split("/")[0] for rel in manifest["fireact"]}
    assert dl.remote_path("fireact", "trajs/a.json") == "trajs/a.json"
    assert dl.remote_path("fireact", "mmlu/dev/a.csv") == "data/mmlu/dev/a.csv"


def test_fresh_download_matches_and_rerun_skips(tmp_path, served, capsys):
    www, manifest = served
    server = FileServer(www)
    with server.running() as base:
        dl.download(_dirs(tmp_path), _urls(base), manifest)
        assert dl.check(_dirs(tmp_path), manifest) == []
        assert (tmp_path / "data" / "trajs" / "run.json").read_bytes() == FILES["fireact"]["trajs/run.json"]
        n = len(server.requests)
        dl.download(_dirs(tmp_path), _urls(base), manifest)  # everything matches: no request
    assert n == 4 and len(server.requests) == n
    assert "all 3 files" in capsys.readouterr().out
    assert not list(tmp_path.rglob("*.part"))


@pytest.mark.parametrize("ranges", [True, False], ids=["resumes", "restarts"])
def test_dropped_connection_errors_then_next_run_completes(tmp_path, served, ranges):
    www, manifest = served
    server = FileServer(www, cut={"/fire/trajs/run.json": 20_000}, ranges=ranges)
    out = tmp_path / "data" / "trajs" / "run.json"
    with server.running() as base:
        with pytest.raises(dl.DownloadError) as e:
            dl.download(_dirs(tmp_path), _urls(base), manifest)
        msg = str(e.value)
        assert "\n" not in msg and str(out) in msg and "interrupted" in msg and "run again" in msg
        assert not out.exists()  # the partial bytes are never the real file
        done = tmp_path / "data" / "bamboogle" / "test.csv"
        assert dl.differs(done, manifest["fireact"]["bamboogle/test.csv"]) is None  # finished before: kept
        dl.download(_dirs(tmp_path), _urls(base), manifest)
    assert dl.check(_dirs(tmp_path), manifest) == []
    retry = [r for p, r in server.requests if p == "/fire/trajs/run.json"]
    assert retry == [None, "bytes=20000-"]  # asked to resume; a server without Range sent it all again
    assert server.requests.count(("/fire/data/bamboogle/test.csv", None)) == 1  # the finished file is not fetched again


def test_file_that_differs_from_manifest_is_one_line_naming_it(tmp_path, served):
    www, manifest = served
    (www / "fire" / "data" / "mmlu" / "dev" / "x_dev.csv").write_bytes(b"q,a,b,c,d,B\n")  # same size, other bytes
    out = tmp_path / "data" / "mmlu" / "dev" / "x_dev.csv"
    with FileServer(www).running() as base, pytest.raises(dl.DownloadError) as e:
        dl.download(_dirs(tmp_path), _urls(base), manifest)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{out}: downloaded file differs from the manifest")
    assert not out.exists() and not out.with_name(out.name + ".part").exists()


def test_multihop_without_url_names_the_setting(tmp_path, served, monkeypatch):
    www, manifest = served
    monkeypatch.delenv("FIREACT_MULTIHOP_URL", raising=False)
    with FileServer(www).running() as base, pytest.raises(dl.DownloadError, match="FIREACT_MULTIHOP_URL"):
        dl.download(_dirs(tmp_path), {"fireact": base + "fire"}, manifest)
    assert dl.check(_dirs(tmp_path), {"fireact": manifest["fireact"]}) == []  # FireAct's files came first


def test_cli_download_and_check(tmp_path, served, capsys):
    www, manifest = served
    mf = tmp_path / "manifest.json"
    dest = ["--dest", str(tmp_path / "data"), "--manifest", str(mf)]
    assert main(["download", "--check", *dest]) == 1
    assert len(capsys.readouterr().out.strip().splitlines()) == 4  # every file missing
    with FileServer(www).running() as base:
        assert main(["download", *dest, "--base-url", base + "fire", "--multihop-url", base + "hop"]) == 0
    assert main(["download", "--check", *dest]) == 0
    (tmp_path / "data" / "bamboogle" / "test.csv").write_text("edited\n")
    capsys.readouterr()
    assert main(["download", "--check", *dest]) == 1
    assert capsys.readouterr().out.strip() == f"{tmp_path / 'data' / 'bamboogle' / 'test.csv'}: size 7, manifest 24"
    with FileServer(www, cut={"/fire/data/bamboogle/test.csv": 3}).running() as base:
        assert main(["download", *dest, "--base-url", base + "fire"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "bamboogle/test.csv" in err[0]


def test_only_fireacts_files_for_the_demo(tmp_path, served, capsys, monkeypatch):
    """`--only fireact` (make demo's `make data DATA_SETS=fireact`) fetches and checks FireAct's
    files and never asks for the multihop URL, which has no default; `--write-manifest` lists every
    set, so it refuses --only."""
    www, manifest = served
    monkeypatch.delenv("FIREACT_MULTIHOP_URL", raising=False)
    mf = tmp_path / "manifest.json"
    dest = ["--dest", str(tmp_path / "data"), "--manifest", str(mf), "--only", "fireact"]
    with FileServer(www).running() as base:
        assert main(["download", *dest, "--base-url", base + "fire"]) == 0
    assert main(["download", "--check", *dest]) == 0
    assert main(["download", "--check", *dest[:-2]]) == 1  # both sets: the multihop file is missing
    assert capsys.readouterr().out.strip().endswith(f"{tmp_path / 'data' / 'multihop' / 'hotpotqa' / 'questions.jsonl'}: missing")
    assert main(["download", "--write-manifest", *dest]) == 2
    assert capsys.readouterr().err == "error: --write-manifest lists every set of files: drop --only\n"


@pytest.mark.slow
def test_a_fresh_machine_fine_tunes_and_evaluates_on_downloaded_data(tmp_path, data_dir, model_path, monkeypatch,
                                                                     capsys):
    """The demo's path on a machine with nothing beside the repository: FireAct's real files served
    from loopback in its repository's layout, fetched into an empty dir with the real manifest
    (`--only fireact`, as `make demo` does), then the smoke fine-tune (a tiny model, 2 steps) and
    an evaluation run on them with no multihop data at all."""
    from tiny import tiny_llama

    monkeypatch.delenv("FIREACT_MULTIHOP_URL", raising=False)
    data, _ = downloaded_data(tmp_path, data_dir, None)
    assert main(["download", "--check", "--dest", str(data), "--only", "fireact"]) == 0
    monkeypatch.setenv("FIREACT_DATA_DIR", str(data))
    monkeypatch.setenv("FIREACT_MULTIHOP_DIR", str(tmp_path / "no-multihop"))  # nothing there
    tiny = tiny_llama(tmp_path / "tiny", model_path, 0)
    ov = [f"output_root={tmp_path / 'runs'}", f"model.name={tiny}", "model.device=cpu", "train.max_steps=2",
          "train.max_length=128", "dataset.n_trajectories=4", "agent.max_turns=2", "agent.max_new_tokens=8"]
    assert main(["finetune", "params/smoke.yaml", *ov]) == 0
    trained = tmp_path / "runs" / "smoke" / "finetune" / "final"
    assert (trained / "train_done.json").is_file()
    capsys.readouterr()
    assert main(["evaluate", "params/smoke.yaml", *ov, "--trained", str(trained), "--mode", "finetuned",
                 "evaluate.n_questions=2", "--name", "ft"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out[:out.index("episodes:")])["n"] == 2 and (tmp_path / "runs" / "smoke" / "eval" / "ft.jsonl").is_file()
