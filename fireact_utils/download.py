"""Fetch the data the kit reads, and check a data dir, against `data_manifest.json`.

A fresh machine gets the exact bytes the README's numbers were measured on, or is told which file
differs: every file is listed in the manifest (path, size, sha256) and checked after download.

    python -m fireact_utils download --dest data                    # = make data; resumes, skips good files
    python -m fireact_utils download --check --dest ../shared/fireact --multihop-dest ../shared/multihop
    python -m fireact_utils download --write-manifest --dest ../shared/fireact --multihop-dest ../shared/multihop

Two sets of files. `fireact`: FireAct's public `data/` and `trajs/` folders, from the raw GitHub URL
at the commit the manifest was made from (`FIREACT_DATA_URL` or `--base-url` for a mirror; it must
lay files out as that repository does). `multihop`: the prebuilt Wikipedia paragraphs of
`$FIREACT_MULTIHOP_DIR`. No public host serves them, so `FIREACT_MULTIHOP_URL` (or `--multihop-url`)
has no default: point it at a copy (`python -m http.server` in one), or copy the folder itself.

Each file downloads into `<name>.part`, resumed with an HTTP Range request on the next run (a
server that ignores Range restarts it); only a file whose size and sha256 match is renamed into
place, so an interrupted or wrong download is never mistaken for the real file.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

MANIFEST = Path(__file__).with_name("data_manifest.json")
FIREACT_COMMIT = "94c6189f04b10fccae6bcd97a4632d6119266899"  # upstream main on 2026-12; every file matched it
FIREACT_URL = f"https://raw.githubusercontent.com/anchen1011/FireAct/{FIREACT_COMMIT}/"
URL_ENV = {"fireact": "FIREACT_DATA_URL", "multihop": "FIREACT_MULTIHOP_URL"}
SKIP = {"README.md", "LICENSE"}  # descriptions of the local copies; the kit reads neither
CHUNK = 1 << 16

Manifest = dict[str, dict[str, dict]]  # set ("fireact" | "multihop") -> relative path -> {size, sha256}


class DownloadError(RuntimeError):
    """A file that could not be fetched or that differs from the manifest: one line naming it."""


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def scan(folder: Path, exclude: tuple[Path, ...] = ()) -> dict[str, dict]:
    """Every file under `folder` (sorted relative path -> size, sha256), less SKIP, hidden and .part
    files and those under `exclude` (./data/multihop sits inside ./data)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")
                   and p.suffix != ".part" and p.relative_to(folder).as_posix() not in SKIP
                   and not any(p.is_relative_to(x) for x in exclude))
    return {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": sha256(p)} for p in files}


def write_manifest(dirs: dict[str, Path], path: Path = MANIFEST) -> Path:
    """Regenerate the manifest from reference copies of each set; one line per file, for readable diffs."""
    roots = {name: Path(d).resolve() for name, d in dirs.items()}
    if missing := [str(d) for d in roots.values() if not d.is_dir()]:
        raise FileNotFoundError(f"no such data dir: {', '.join(missing)}")
    sets = {name: scan(d, tuple(x for x in roots.values() if x != d and x.is_relative_to(d)))
            for name, d in roots.items()}
    body = ",\n".join(f'  "{name}": {{\n' + ",\n".join(f"    {json.dumps(rel)}: {json.dumps(meta)}"
                                                      for rel, meta in files.items()) + "\n  }"
                      for name, files in sets.items())
    path.write_text("{\n" + body + "\n}\n")
    return path


def load_manifest(path: Path = MANIFEST) -> Manifest:
    return json.loads(Path(path).read_text())


def differs(path: Path, meta: dict) -> str | None:
    """Why `path` is not the manifest's file (None when it is); the size is checked before hashing."""
    if not path.is_file():
        return "missing"
    if (size := path.stat().st_size) != meta["size"]:
        return f"size {size}, manifest {meta['size']}"
    if (digest := sha256(path)) != meta["sha256"]:
        return f"sha256 {digest[:12]}…, manifest {meta['sha256'][:12]}…"
    return None


def check(dirs: dict[str, Path], manifest: Manifest | None = None) -> list[str]:
    """One line per manifest file that is missing or differs under `dirs` (set -> folder); extra files are ignored."""
    manifest = load_manifest() if manifest is None else manifest
    return [f"{Path(dirs[name]) / rel}: {why}" for name, files in manifest.items() if name in dirs
            for rel, meta in files.items() if (why := differs(Path(dirs[name]) / rel, meta))]


def remote_path(name: str, rel: str) -> str:
    """Where a file sits under its set's base URL: FireAct keeps `trajs/` at its root, the rest under `data/`."""
    return rel if name != "fireact" or rel.startswith("trajs/") else f"data/{rel}"


def base_url(name: str, given: str | None = None) -> str | None:
    """The argument, else the set's environment variable, else (FireAct only) the pinned public URL."""
    url = given or os.environ.get(URL_ENV[name]) or (FIREACT_URL if name == "fireact" else None)
    return url if url is None or url.endswith("/") else url + "/"


def fetch(url: str, out: Path, meta: dict, timeout_s: float = 60.0) -> None:
    """Download `url` to `out` through `out.part`, resuming a partial one; raise DownloadError naming `out`.

    An interrupted transfer keeps `.part` for the next run; a complete one that differs from the
    manifest is deleted, so the next run starts over rather than resuming wrong bytes."""
    part = out.with_name(out.name + ".part")
    part.parent.mkdir(parents=True, exist_ok=True)
    if part.is_file() and part.stat().st_size >= meta["size"]:
        part.unlink()  # as long as the file or longer: a complete-but-unverified or wrong earlier try
    have = part.stat().st_size if part.is_file() else 0
    h = hashlib.sha256()
    req = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            if have and r.status == 206:  # resumed: hash what is there, then append
                with open(part, "rb") as f:
                    while block := f.read(1 << 20):
                        h.update(block)
            else:
                have = 0  # the server sent the whole file
            with open(part, "ab" if have else "wb") as f:
                while block := r.read(CHUNK):
                    f.write(block)
                    h.update(block)
            if r.length:  # bytes still owed by Content-Length: read(n) returns b"" on a dropped connection
                raise http.client.IncompleteRead(b"", r.length)
    except urllib.error.HTTPError as e:
        if e.code == 416:  # the server's file is no longer than our partial one: start over next run
            part.unlink(missing_ok=True)
        raise DownloadError(f"{out}: HTTP {e.code} from {url}") from e
    except (OSError, http.client.HTTPException) as e:
        got, why = part.stat().st_size if part.is_file() else 0, f"{type(e).__name__}: {' '.join(str(e).split())}"
        if not got:
            raise DownloadError(f"{out}: could not download {url} ({why}); offline? copy the data instead") from e
        raise DownloadError(f"{out}: download interrupted after {got} of {meta['size']} bytes ({why}); "
                            "run again to resume") from e
    size = part.stat().st_size
    if size != meta["size"] or h.hexdigest() != meta["sha256"]:
        part.unlink()
        raise DownloadError(f"{out}: downloaded file differs from the manifest (size {size}, sha256 "
                            f"{h.hexdigest()[:12]}…; manifest size {meta['size']}, sha256 {meta['sha256'][:12]}…)")
    os.replace(part, out)


def download(dirs: dict[str, Path], urls: dict[str, str | None] | None = None,
             manifest: Manifest | None = None, timeout_s: float = 60.0) -> dict[str, Path]:
    """Make each set's folder in `dirs` hold the manifest's files: skip those that match, fetch the
    rest from the set's base URL (`base_url`). Stops at the first failure, keeping finished files."""
    manifest = load_manifest() if manifest is None else manifest
    for name, files in manifest.items():
        if name not in dirs:
            continue
        todo = {rel: meta for rel, meta in files.items() if differs(Path(dirs[name]) / rel, meta)}
        if not todo:
            print(f"{name}: all {len(files)} files in {dirs[name]} match the manifest")
            continue
        if (url := base_url(name, (urls or {}).get(name))) is None:
            raise DownloadError(f"{name}: {len(todo)} of {len(files)} files missing from {dirs[name]} and no public "
                                f"host serves them: set {URL_ENV[name]} (or --multihop-url) to a base URL that does "
                                "(e.g. `python -m http.server` in a copy of ../shared/multihop), or copy that "
                                "folder there")
        print(f"{name}: fetching {len(todo)} of {len(files)} files from {url}")
        for rel, meta in todo.items():
            fetch(url + urllib.parse.quote(remote_path(name, rel)), Path(dirs[name]) / rel, meta, timeout_s)
    return dirs
