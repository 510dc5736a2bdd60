"""Output files: atomic writes, per-split partial record files with a signature header."""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lens.evaluation.config import log


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file next to ``path``, fsync, then rename over ``path``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: Path, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def partial_path(out: Path, stem: str, rank: int) -> Path:
    return out / (f"{stem}.partial.jsonl" if rank == 0 else f"{stem}.partial.rank{rank}.jsonl")


def partial_files(out: Path, stem: str) -> list[Path]:
    return sorted(Path(p) for p in glob.glob(str(out / f"{glob.escape(stem)}.partial*.jsonl")))


def read_partial(path: Path, signature: dict[str, Any]) -> list[dict[str, Any]]:
    """Records of one partial file; its header must match ``signature``. A torn last line is dropped."""
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for k, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            if k == len(lines) - 1:
                log(f"{path}: dropping an incomplete last line (interrupted write)")
                continue
            raise ValueError(f"{path}:{k + 1}: corrupt record line; delete the file or pass --overwrite") from None
        if "header" in obj:
            check_signature(obj["header"], signature, path)
        else:
            records.append(obj)
    return records


def check_signature(found: dict[str, Any], expected: dict[str, Any], where: Path) -> None:
    """Refuse to mix records or results made under different settings."""
    diff = {k: (found.get(k), v) for k, v in expected.items() if found.get(k) != v}
    if diff:
        detail = ", ".join(f"{k}: {a!r} there vs {b!r} now" for k, (a, b) in diff.items())
        raise ValueError(f"{where} was written with different settings ({detail}); "
                         "pass --overwrite or use another --out")


class PartialWriter:
    """Appends per-batch records (one JSON line each, flushed and fsynced) after a header line."""

    def __init__(self, path: Path, signature: dict[str, Any]) -> None:
        self.path, self.signature = path, signature
        self._fh = None

    def write(self, records: Iterable[dict[str, Any]]) -> None:
        if self._fh is None:
            new = not self.path.exists() or self.path.stat().st_size == 0
            self._fh = open(self.path, "a", encoding="utf-8")
            if new:
                self._fh.write(json.dumps({"header": self.signature}) + "\n")
        self._fh.write("".join(json.dumps(r) + "\n" for r in records))
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def split_files(out: Path, stem: str) -> list[Path]:
    """Everything a split writes (removed by ``--overwrite``)."""
    files = [out / f"{stem}.json", out / f"{stem}.predictions.jsonl", out / f"{stem}.prediction_issues.json",
             *partial_files(out, stem)]
    return [p for p in files if p.exists()]
