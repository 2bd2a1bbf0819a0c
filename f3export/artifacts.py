"""The artifact folder: atomic writes, content hashes, and the manifest that caches stages.

A stage counts as done only when its manifest entry is written, and that entry
records the stage's input key and the SHA-256 of every file it produced. A
rebuild reuses a stage when its key is unchanged and its files still hash as
recorded; anything else is rebuilt, so a partial or tampered file is never used.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

MANIFEST = "manifest.json"


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; rename it into place only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path: Path, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def content_key(*parts: Any) -> str:
    """A stable hash of JSON-serialisable inputs."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


@dataclass
class StageRecord:
    key: str
    files: dict[str, str]  # path relative to the artifact folder -> sha256
    data: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


class Manifest:
    """``manifest.json`` of one artifact folder."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.path = self.root / MANIFEST
        self.doc: dict[str, Any] = {"stages": {}}
        if self.path.is_file():
            try:
                self.doc = json.loads(self.path.read_text())
            except json.JSONDecodeError:
                self.doc = {"stages": {}}  # a damaged manifest only costs a full rebuild
        self.doc.setdefault("stages", {})

    def record(self, stage: str) -> StageRecord | None:
        raw = self.doc["stages"].get(stage)
        return StageRecord(**raw) if raw else None

    def reusable(self, stage: str, key: str) -> StageRecord | None:
        """The stage's record if its key matches and all its files are intact."""
        record = self.record(stage)
        if record is None or record.key != key:
            return None
        for rel, digest in record.files.items():
            file = self.root / rel
            if not file.is_file() or sha256_file(file) != digest:
                return None
        return record

    def complete(self, stage: str, key: str, files: list[Path], data: dict[str, Any], seconds: float) -> StageRecord:
        record = StageRecord(
            key=key,
            files={str(f.relative_to(self.root)): sha256_file(f) for f in files},
            data=data,
            seconds=round(seconds, 3),
        )
        self.doc["stages"][stage] = record.__dict__
        self.save()
        return record

    def invalidate_from(self, stages: list[str]) -> None:
        for stage in stages:
            self.doc["stages"].pop(stage, None)
        self.save()

    def save(self) -> None:
        self.doc["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        write_json(self.path, self.doc)
