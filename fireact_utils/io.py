"""Safe file I/O: atomic writes, append-only JSONL, and readers that name the bad line.

Every artifact of a run goes through here so that a crash (or SIGKILL) never leaves a
half-written file that a later run would read back as data.
"""

from __future__ import annotations

import csv
import json
import os
import tempfile
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any


class DataFileError(ValueError):
    """A data file is missing or malformed; the message names the path (and line)."""


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write `text` to `path` via a temp file + rename, so readers see old or new, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_json(path: str | Path, obj: Any, indent: int | None = 2) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False, default=str) + "\n")


def repair_torn_tail(path: str | Path) -> None:
    """Make `path` end with a newline, so an append never glues onto a line torn by a kill.

    A torn tail that does not parse is cut off (its episode never finished and is re-run);
    a complete record that only lacks its newline gets one. Costs one seek when the file is fine.
    """
    with open(path, "rb+") as f:
        if f.seek(0, os.SEEK_END) == 0:
            return
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return
        f.seek(0)
        data = f.read()
        start = data.rfind(b"\n") + 1
        try:
            complete = isinstance(json.loads(data[start:]), dict)
        except ValueError:  # includes a multi-byte character cut in half
            complete = False
        if complete:
            f.write(b"\n")
        else:
            f.truncate(start)


def append_jsonl(path: str | Path, record: dict) -> None:
    """Append one record as one line, flushed and fsynced: a kill loses at most this line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_file():
        repair_torn_tail(path)
    line = json.dumps(record, ensure_ascii=False, default=str) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise DataFileError(f"file not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataFileError(f"malformed JSON in {path} at line {e.lineno}: {e.msg}") from e


def iter_jsonl(path: str | Path, skip_bad: bool = False, tolerate_torn_tail: bool = True) -> Iterator[dict]:
    """Yield the records of a JSONL file.

    A malformed line raises `DataFileError` naming path and line number, unless `skip_bad`
    (then it is skipped with a warning giving the count). A last line without its newline is a
    write torn by a kill: with `tolerate_torn_tail` it is dropped silently-but-warned, since the
    episode it held was never finished.
    """
    path = Path(path)
    if not path.is_file():
        raise DataFileError(f"file not found: {path}")
    bad = 0
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            torn = i == len(lines) and not line.endswith("\n")
            if torn and tolerate_torn_tail:
                warnings.warn(f"{path}: dropping torn last line {i} (interrupted write)", stacklevel=2)
                continue
            if skip_bad:
                bad += 1
                continue
            raise DataFileError(f"malformed JSONL in {path} at line {i}: {e}") from e
        yield rec
    if bad:
        warnings.warn(f"{path}: skipped {bad} malformed line(s)", stacklevel=2)


def read_jsonl(path: str | Path, skip_bad: bool = False) -> list[dict]:
    return list(iter_jsonl(path, skip_bad=skip_bad))


def write_jsonl(path: str | Path, records: Iterable[dict]) -> Path:
    text = "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in records)
    return atomic_write_text(path, text)


def read_csv_rows(path: str | Path, n_cols: int | None = None, header: bool = False) -> list[list[str]]:
    """Rows of a CSV file; a row with the wrong number of columns names path and line."""
    path = Path(path)
    if not path.is_file():
        raise DataFileError(f"file not found: {path}")
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    if header:
        rows = rows[1:]
    if n_cols is not None:
        for i, row in enumerate(rows, 2 if header else 1):
            if len(row) != n_cols:
                raise DataFileError(f"malformed CSV in {path} at row {i}: expected {n_cols} columns, got {len(row)}")
    return rows
