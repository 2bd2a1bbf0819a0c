"""Stage outputs shared by the builds of one output folder, addressed by what made them and what they hold.

    <output dir>/.cache/<name>/<key>.<content>/entry.json   {"files": {path in the build folder: sha256}, "data": {...}}
    <output dir>/.cache/<name>/<key>.<content>/<files>       copies of the files a build wrote

``name`` is a stage (``calibrate``), or a stage's work on the original model alone (``export:original``): a
build whose [pruning] changed reuses the original's ONNX file and engine; a build under another output name
reuses the calibration. ``key`` is the stage key (the hash of every input the stage declares), ``content`` the
SHA-256 of the entry's record (every file's hash and the data the manifest takes), so every byte a reused
entry contributes is covered by a hash the reuse checks: an entry whose record does not hash as its name says,
that is malformed, names a path outside itself or the build folder, or holds a file whose copy does not hash
as recorded is a miss (the work is done again).

Trust: the cache holds outputs, never verdicts. The validate stage never reads or writes it (every build
computes its own gates from fresh goldens), and a manifest's contract is compared with the one its engines
carry (``FinishedBuild.verified_engine``). So an edited entry can cost a rebuild, or fail a gate or a check;
it cannot make a build pass.

Builds never alias each other or the cache: a reused file is a copy, a reflink (a copy-on-write clone, no
extra space) where the file system has them, else bytes copied. Hard links would share one inode, so an edit
in place of one build's file would change every other build's and the cache's. The folder lies inside
``F3EXPORT_ALLOWED_ROOTS`` and is a plain folder (no symlink); an entry that is not (a symlink) is a miss.
Writing is best effort: a cache that is read-only or full is a note, and the build goes on without it. The
folder only grows: delete it to reclaim space.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, NamedTuple

from .artifacts import FILE_MODE, inside, sha256_file
from .errors import CheckError, F3ExportError
from .report import console
from .roots import RootsError, confine

CACHE_FOLDER = ".cache"
ENTRY = "entry.json"
LOCKS = "locks"
# <output dir>/.cache/text-embeddings/<key>.safetensors: a text encoder's embedding of one prompt, each checked
# against the hash its metadata records (``PromptEncoder.keep_on_disk``)
TEXT_EMBEDDINGS = "text-embeddings"
FICLONE = 0x40049409  # Linux ioctl: the target shares the source's blocks copy-on-write (btrfs, XFS, ...)


class CachedOutput(NamedTuple):
    files: list[Path]  # placed in the build folder
    data: dict[str, Any]
    hashes: dict[str, str]  # SHA-256 of each file, by path relative to the build folder (checked when fetched)


def plain_folder(path: Path, what: str) -> Path:
    """``path``, refused in one line unless it is a plain folder (or absent) inside the allowed roots."""
    if path.is_symlink() or path.exists() and not path.is_dir():
        raise F3ExportError(f"{path}: the {what} is not a plain folder (a symlink or a file); refusing to read or "
                            "write through it. Remove it and build again")
    confine(path, what)
    return path


def copy_unshared(source: Path, target: Path) -> None:
    """``target``: a copy of ``source`` sharing nothing writable with it (a reflink where possible)."""
    with open(source, "rb") as src, open(target, "wb") as dst:
        try:
            fcntl.ioctl(dst.fileno(), FICLONE, src.fileno())
            return
        except OSError:  # no reflinks here (ext4, tmpfs, another file system): copy the bytes
            pass
    shutil.copyfile(source, target)


def record_digest(record: dict[str, Any]) -> str:
    """The content half of an entry's name: SHA-256 of its record as stored (JSON, keys sorted)."""
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


class StageCache:
    def __init__(self, folder: Path):
        self.folder = plain_folder(folder, "shared stage cache")

    def _stage(self, name: str) -> Path:
        return self.folder / name.replace(":", "-")

    def _record(self, entry: Path, key: str) -> dict[str, Any] | None:
        """The entry's record if its name, its record and its place are right; else None."""
        if entry.is_symlink() or not entry.name.startswith(f"{key}."):
            return None
        try:
            confine(entry, "shared stage cache entry")
            record = json.loads((entry / ENTRY).read_text())
        except (OSError, ValueError, RootsError):
            return None
        if not (isinstance(record, dict) and isinstance(record.get("files"), dict)
                and isinstance(record.get("data"), dict)) or entry.name != f"{key}.{record_digest(record)}":
            return None
        return record

    def fetch(self, name: str, key: str, root: Path) -> CachedOutput | None:
        """A good entry's files copied into the build folder ``root`` (each copy hashing as recorded), its data
        and the files' hashes; None where there is none."""
        stage = self._stage(name)
        if stage.is_symlink() or not stage.is_dir():
            return None
        for entry in sorted(stage.glob(f"{key}.*")):
            record = self._record(entry, key)
            if record is not None and (placed := _place_all(entry, record["files"], root)) is not None:
                return CachedOutput(placed, record["data"], dict(record["files"]))
        return None

    def store(self, name: str, key: str, root: Path, files: list[Path], data: dict[str, Any],
              hashes: dict[str, str] | None = None) -> None:
        """An entry of ``files`` (in ``root``) and ``data``; ``hashes``: the files' SHA-256 by relative path where
        the caller has them already (a build's manifest record), so large files are not read again. A cache
        that cannot be written (read-only, full, a symlink) is a note, not a failed build."""
        stage = self._stage(name)
        tmp = stage / f".{key}.tmp-{os.getpid()}"
        try:
            if stage.is_symlink():
                raise OSError(f"{stage} is a symlink")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            listed = {}
            for path in files:
                rel = str(path.relative_to(root))
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                copy_unshared(path, tmp / rel)
                listed[rel] = (hashes or {}).get(rel) or sha256_file(path)
            # stored as JSON reads it back, so the digest is of exactly what a fetch reads
            record = json.loads(json.dumps({"files": listed, "data": data}, default=str))
            (tmp / ENTRY).write_text(json.dumps(record, indent=1))
            entry = stage / f"{key}.{record_digest(record)}"
            if entry.is_symlink() or entry.is_file():
                entry.unlink()
            elif entry.exists():
                if self._record(entry, key) is not None and not _changed(entry, listed):
                    return  # the same content is there already
                shutil.rmtree(entry)  # a damaged entry of the same name
            tmp.rename(entry)
        except OSError as exc:
            console.print(f"[bold yellow]note:[/] the shared stage cache {self.folder} was not written "
                          f"({exc.strerror or exc}); this build goes on without it", highlight=False, soft_wrap=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _changed(entry: Path, files: dict[str, str]) -> bool:
    """Whether a file of the entry no longer hashes as listed."""
    try:
        return any(sha256_file(inside(entry, rel, str(entry / ENTRY))) != digest for rel, digest in files.items())
    except (OSError, CheckError):
        return True


def _place_all(entry: Path, files: dict[str, str], root: Path) -> list[Path] | None:
    """Every file of the entry copied to its place in ``root``, all or none: each copy is hashed (the bytes the
    build gets, not the cache's, which could change between a check and a copy) before any is renamed in."""
    staged: dict[Path, Path] = {}
    try:
        for rel, digest in files.items():
            source, target = inside(entry, rel, str(entry / ENTRY)), inside(root, rel, str(entry / ENTRY))
            if source.is_symlink() or not source.is_file():
                return None
            target.parent.mkdir(parents=True, exist_ok=True)
            staged[target] = target.with_name(f".{target.name}.tmp-{os.getpid()}")
            copy_unshared(source, staged[target])
            if sha256_file(staged[target]) != digest:
                return None
        for target, tmp in staged.items():
            tmp.chmod(FILE_MODE)
            os.replace(tmp, target)
        placed, staged = list(staged), {}
        return placed
    except (OSError, CheckError):
        return None
    finally:
        for tmp in staged.values():
            tmp.unlink(missing_ok=True)
