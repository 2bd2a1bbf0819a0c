"""Stage outputs shared by the builds of one output folder, addressed by what they were made from.

    <output dir>/.cache/<name>/<key>/entry.json     {"files": {path in the build folder: sha256}, "data": {...}}
    <output dir>/.cache/<name>/<key>/<files>         hard links to (else copies of) the files a build wrote

``name`` is a stage (``calibrate``), or a stage's work on the original model alone (``export:original``): a
build whose [pruning] changed reuses the original's ONNX file, engine and golden checks; a build under another
output name reuses the calibration. The key is the stage key (the hash of every input the stage declares), so
an entry is right for every build that computes the same key. An entry is written to a temporary folder and
renamed into place when complete, and read as untrusted input: an entry that is malformed, names a path
outside itself, or holds a file that does not hash as recorded is a miss (the work is done again and the
entry replaced). Files are hard-linked where the file system allows (builds replace files by renaming, never
write into them, so a link never changes under a build); the folder only grows: delete it to reclaim space.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, NamedTuple

from .artifacts import atomic_path, inside, sha256_file
from .errors import CheckError

CACHE_FOLDER = ".cache"
ENTRY = "entry.json"
# <output dir>/.cache/text-embeddings/<key>.safetensors: a text encoder's embedding of one prompt, each checked
# against the hash its metadata records (``PromptEncoder.keep_on_disk``)
TEXT_EMBEDDINGS = "text-embeddings"


class CachedOutput(NamedTuple):
    files: list[Path]  # placed in the build folder
    data: dict[str, Any]
    hashes: dict[str, str]  # SHA-256 of each file, by path relative to the build folder (checked when fetched)


def _place(source: Path, target: Path) -> None:
    """``target`` as a hard link to ``source``, else a copy (another file system, links refused)."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


class StageCache:
    def __init__(self, folder: Path):
        self.folder = folder

    def _entry(self, name: str, key: str) -> Path:
        return self.folder / name.replace(":", "-") / key

    def fetch(self, name: str, key: str, root: Path) -> CachedOutput | None:
        """The entry's files placed in the build folder ``root``, its data and the files' hashes (checked); None
        where there is no good entry."""
        entry = self._entry(name, key)
        try:
            record = json.loads((entry / ENTRY).read_text())
            files, data = record["files"], record["data"]
            if not (isinstance(files, dict) and isinstance(data, dict)):
                return None
            sources = {rel: inside(entry, rel, str(entry / ENTRY)) for rel in files}
            targets = {rel: inside(root, rel, str(entry / ENTRY)) for rel in files}
        except (OSError, ValueError, KeyError, TypeError, CheckError):
            return None
        for rel, digest in files.items():
            if not sources[rel].is_file() or sha256_file(sources[rel]) != digest:
                return None
        for rel in files:
            with atomic_path(targets[rel]) as tmp:
                _place(sources[rel], tmp)
        return CachedOutput(list(targets.values()), data, dict(files))

    def store(self, name: str, key: str, root: Path, files: list[Path], data: dict[str, Any],
              hashes: dict[str, str] | None = None) -> None:
        """An entry of ``files`` (in ``root``) and ``data``; ``hashes``: the files' SHA-256 by relative path where
        the caller has them already (a build's manifest record), so large files are not read again."""
        entry = self._entry(name, key)
        tmp = entry.with_name(f".{key}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            record = {}
            for path in files:
                rel = path.relative_to(root)
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                _place(path, tmp / rel)
                record[str(rel)] = (hashes or {}).get(str(rel)) or sha256_file(path)
            (tmp / ENTRY).write_text(json.dumps({"files": record, "data": data}, indent=1, default=str))
            shutil.rmtree(entry, ignore_errors=True)  # a damaged entry of the same key
            tmp.rename(entry)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
