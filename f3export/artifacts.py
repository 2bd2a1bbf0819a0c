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
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from .errors import CheckError, F3ExportError
from .roots import confine

if TYPE_CHECKING:
    from .recipe import Recipe

MANIFEST = "manifest.json"
BUILD_STAGES = ("calibrate", "plan", "prune", "export", "engine", "validate")
MODEL_VARIANTS = ("original", "pruned")
VALIDATION_REPORT = "validation.json"
MAX_MANIFEST_BYTES = 64 << 20  # far above any real manifest; a larger one is not parsed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_umask()  # what a plain open() gives a new file here: one mode for every file written


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; rename it into place only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        tmp.chmod(FILE_MODE)  # whatever wrote it (safetensors writes 0600): the mode of every artifact
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def staged_model(path: Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``path`` to write ``path.name`` in, and its external data
    ``path.name + ".data"`` if it has any. Only if the block succeeds do they replace the final files, the
    data first (``path`` never names missing data) and an earlier version's data removed if there is none now.
    One helper for every model file written (export, ONNX Runtime, TensorRT): a crash leaves no partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.tmp-") as tmp:
        yield Path(tmp)
        for staged in Path(tmp).iterdir():
            staged.chmod(FILE_MODE)  # a temporary folder's files are private to their writer
        data = path.with_name(path.name + ".data")
        if (Path(tmp) / data.name).exists():
            os.replace(Path(tmp) / data.name, data)
        elif data.exists():
            data.unlink()
        os.replace(Path(tmp) / path.name, path)


def write_json(path: Path, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def sha256_file(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


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
            except (json.JSONDecodeError, UnicodeDecodeError):
                self.doc = {}
        if not isinstance(self.doc, dict) or not isinstance(self.doc.get("stages"), dict):
            self.doc = {"stages": {}}  # a damaged manifest only costs a full rebuild

    def record(self, stage: str) -> StageRecord | None:
        try:
            return parse_stage(self.doc["stages"].get(stage), stage, self.root)
        except CheckError:
            return None  # a damaged entry only costs a rerun of the stage

    def reusable(self, stage: str, key: str) -> StageRecord | None:
        """The stage's record if its key matches and all its files are intact (and inside the folder)."""
        record = self.record(stage)
        if record is None or record.key != key:
            return None
        for rel, digest in record.files.items():
            file = self.root / rel
            if not file.is_file() or sha256_file(file) != digest:
                return None
        return record

    def complete(self, stage: str, key: str, files: list[Path], data: dict[str, Any], seconds: float,
                 hashes: dict[str, str] | None = None) -> StageRecord:
        """Record a finished stage; ``hashes``: SHA-256s already checked (by relative path), not read again."""
        known = hashes or {}
        relative = {f: str(f.relative_to(self.root)) for f in files}
        record = StageRecord(
            key=key,
            files={rel: known.get(rel) or sha256_file(f) for f, rel in relative.items()},
            data=data,
            seconds=round(seconds, 3),
        )
        self.doc["stages"][stage] = record.__dict__
        self.save()
        return record

    def save(self) -> None:
        self.doc["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        write_json(self.path, self.doc)


# -- reading a finished build: the folder is untrusted input (copied between machines and CI jobs) -------
def inside(root: Path, rel: Any, where: str) -> Path:
    """``root / rel`` for a path read from a manifest: relative, and inside ``root`` once resolved."""
    if not isinstance(rel, str) or not rel or "\x00" in rel:
        raise CheckError(f"{where}: expected a relative path, got {rel!r}")
    if os.path.isabs(rel):
        raise CheckError(f"{where}: {rel!r} is an absolute path; artifact paths are relative to the folder")
    path = root / rel
    if not path.resolve().is_relative_to(root.resolve()):
        raise CheckError(f"{where}: {rel!r} leads outside {root} (symlinks resolved)")
    return path


def _expect(value: Any, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(value, kind) or isinstance(value, bool) and kind in (int, float, (int, float)):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise CheckError(f"{where}: expected {names}, got {type(value).__name__} {str(value)[:60]!r}")
    return value


def parse_stage(raw: Any, stage: str, root: Path, where: str = MANIFEST) -> StageRecord | None:
    """A stage entry of the manifest, every field checked; None when the stage is absent."""
    if raw is None:
        return None
    where = f"{where}: stages.{stage}"
    _expect(raw, dict, where)
    for key in ("key", "files", "data"):
        if key not in raw:
            raise CheckError(f"{where}: missing {key!r}")
    files = _expect(raw["files"], dict, f"{where}.files")
    for rel, digest in files.items():
        inside(root, rel, f"{where}.files")
        if not isinstance(digest, str) or len(digest) != 64 or not all(c in "0123456789abcdef" for c in digest):
            raise CheckError(f"{where}.files[{rel!r}]: expected a SHA-256 hex digest, got {str(digest)[:70]!r}")
    return StageRecord(key=_expect(raw["key"], str, f"{where}.key"), files=files,
                       data=_expect(raw["data"], dict, f"{where}.data"),
                       seconds=_expect(raw.get("seconds", 0.0), (int, float), f"{where}.seconds"))


@dataclass(frozen=True)
class EngineEntry:
    name: str  # "<variant>.<backend>"
    variant: str
    backend: str
    path: Path
    goldens: Path


@dataclass
class FinishedBuild:
    """A build that finished and passed, read from its folder with every field and path checked.

    Opening it proves the manifest is well-formed, says ``passed``, lists every
    stage and exactly the engines its recipe asks for, and names only files
    inside the folder that some stage recorded (and so hashed).
    """

    root: Path
    doc: dict[str, Any]
    recipe: "Recipe"
    stages: dict[str, StageRecord]
    engines: dict[str, EngineEntry]
    digest: str  # SHA-256 of manifest.json as read

    def path(self, rel: Any, where: str) -> Path:
        return inside(self.root, rel, f"{self.root / MANIFEST}: {where}")

    def verify_files(self, stages: tuple[str, ...] = BUILD_STAGES) -> int:
        """Check the SHA-256 of every file the given stages recorded; returns how many were checked."""
        checked = 0
        for stage in stages:
            for rel, digest in self.stages[stage].files.items():
                path = self.path(rel, f"stages.{stage}.files")
                if not path.is_file():
                    raise CheckError(f"{path}: missing (recorded by stage '{stage}')")
                if sha256_file(path) != digest:
                    raise CheckError(f"{path}: content changed since the build (sha256 mismatch; rebuild it)")
                checked += 1
        return checked

    def verify(self) -> int:
        """Every recorded file hashing as recorded, and every engine carrying the manifest's contract; returns how
        many files were checked."""
        checked = self.verify_files()
        for entry in self.engines.values():
            self.verify_contract(entry)
        return checked

    def verified_file(self, rel: Any, stage: str, where: str) -> Path:
        """A file the stage recorded (with its external data, if recorded), hashing as recorded."""
        path = self.path(rel, where)
        recorded = self.stages[stage].files
        if rel not in recorded:
            raise CheckError(f"{self.root / MANIFEST}: {where} = {rel!r} is not a file the {stage} stage recorded")
        for name in (rel, rel + ".data"):
            if name in recorded and (not (self.root / name).is_file() or
                                     sha256_file(self.root / name) != recorded[name]):
                raise CheckError(f"{self.root / name}: content changed since the build (sha256 mismatch); not served")
        return path

    def verified_engine(self, name: str) -> EngineEntry:
        """An engine entry whose files (the engine and its external data) hash as the build recorded, and whose
        embedded contract is the manifest's."""
        entry = self.engines[name]
        self.verified_file(str(entry.path.relative_to(self.root)), "engine", f"engines.{name}.path")
        self.verify_contract(entry)
        return entry

    def verify_contract(self, entry: EngineEntry) -> None:
        """The manifest's ``contract`` (what a runtime drives the engine by: inputs, ranges, the scheduler) must be
        the one the engine carries: an ONNX Runtime engine in its own metadata, a TensorRT plan in its ONNX
        file's. Either can be edited alone; a mismatch is refused rather than one of them believed."""
        source = entry.path
        if entry.backend != "onnxruntime":
            exported = self.stages["export"].data.get(entry.variant)
            rel = exported.get("path") if isinstance(exported, dict) else None
            source = self.verified_file(rel, "export", f"stages.export.data.{entry.variant}.path")
        problem = contract_mismatch(self.doc.get("contract"), source)
        if problem:
            raise CheckError(f"{self.root / MANIFEST}: {problem} (one of them was edited after the build); not "
                             "served: rebuild it")

    def component_engine(self, name: str) -> Path:
        """The ONNX Runtime engine of a pipeline component (``components.<name>``), hashing as built."""
        components = self.doc.get("components") or {}
        entry = components.get(name) if isinstance(components, dict) else None
        if not isinstance(entry, dict) or entry.get("backend") != "onnxruntime":
            raise CheckError(f"{self.root / MANIFEST}: components.{name}: no ONNX Runtime engine")
        return self.verified_file(entry.get("engine"), "engine", f"components.{name}.engine")


def contract_mismatch(recorded: Any, source: Path) -> str | None:
    """Where ``recorded`` (a manifest's or a cache entry's contract) differs from the one embedded in the ONNX
    file ``source``, as one line; None when they are the same, or when ``source`` is no ONNX file at all (the
    engine's loader refuses it then, in its own words)."""
    from .contract import read_contract  # (onnx: not needed to open a build, only to serve or check one)

    try:
        embedded = read_contract(source)
    except Exception:  # onnx's parser: DecodeError, ValueError, ...
        return None
    if embedded == recorded:
        return None
    return f"{first_difference(recorded, embedded, 'contract')} differs from the contract embedded in {source}"


def first_difference(recorded: Any, embedded: Any, where: str) -> str:
    """The first key path at which two contracts differ (for the one-line error)."""
    if isinstance(recorded, dict) and isinstance(embedded, dict):
        for key in sorted(set(recorded) | set(embedded), key=str):
            if recorded.get(key) != embedded.get(key):
                return first_difference(recorded.get(key), embedded.get(key), f"{where}.{key}")
    return where


def open_build(root: str | Path, expect_sha256: str | None = None, runtime: bool = False) -> FinishedBuild:
    """The finished, passed build in ``root`` (for check, bench and the runtime), or one line saying why not.

    ``runtime``: read only the recipe sections serving engines needs (``Recipe.for_runtime``), without PyTorch."""
    from .recipe import Recipe  # the recipe module needs the models package; artifacts stays importable alone

    root = Path(root)
    confine(root, "artifact folder")
    manifest = root / MANIFEST
    if not manifest.is_file():
        raise CheckError(f"{root}: no {MANIFEST} (not an f3export artifact folder, or the build never finished)")
    inside(root, MANIFEST, str(root))  # a manifest.json symlinked from elsewhere is not this folder's
    if manifest.stat().st_size > MAX_MANIFEST_BYTES:
        raise CheckError(f"{manifest}: {manifest.stat().st_size:,} bytes, not a manifest f3export wrote")
    blob = manifest.read_bytes()
    digest = hashlib.sha256(blob).hexdigest()
    if expect_sha256 is not None and digest != expect_sha256.lower():
        raise CheckError(f"{manifest}: sha256 {digest} is not the expected {expect_sha256}")
    try:
        doc = json.loads(blob)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckError(f"{manifest}: not valid JSON ({exc})") from None
    _expect(doc, dict, str(manifest))
    status = doc.get("status")
    if status == "failed":
        raise CheckError(f"{manifest}: this build FAILED its validation gates; its engines are not served "
                         "(see validation.json, fix the recipe and rebuild)")
    if status != "passed":
        raise CheckError(f"{manifest}: the build did not finish (status {status!r}); run f3export build again")
    for key in ("recipe", "stages", "engines", "versions"):
        if key not in doc:
            raise CheckError(f"{manifest}: missing {key!r}")
    versions = _expect(doc["versions"], dict, f"{manifest}: versions")
    try:
        recipe = (Recipe.for_runtime if runtime else Recipe.from_dict)(
            Path(_expect(doc.get("recipe_file", "recipe.toml"), str, f"{manifest}: recipe_file")),
            _expect(doc["recipe"], dict, f"{manifest}: recipe"))
    except F3ExportError as exc:
        from . import __version__

        if versions.get("f3export") != __version__:
            raise F3ExportError(f"{manifest}: built by f3export {versions.get('f3export')!r}, whose recipe does "
                                f"not match this f3export {__version__} ({exc}); rebuild with f3export build") from None
        raise CheckError(f"{manifest}: malformed recipe ({exc})") from None
    raw_stages = _expect(doc["stages"], dict, f"{manifest}: stages")
    missing = [s for s in BUILD_STAGES if s not in raw_stages]
    if missing:
        raise CheckError(f"{manifest}: stages {', '.join(missing)} missing (a finished build has "
                         f"{', '.join(BUILD_STAGES)})")
    stages = {s: parse_stage(raw_stages[s], s, root, str(manifest)) for s in BUILD_STAGES}
    engines = _parse_engines(_expect(doc["engines"], dict, f"{manifest}: engines"), recipe, stages, root, manifest)
    return FinishedBuild(root, doc, recipe, stages, engines, digest)


def _parse_engines(raw: dict[str, Any], recipe: "Recipe", stages: dict[str, StageRecord], root: Path,
                   manifest: Path) -> dict[str, EngineEntry]:
    """Exactly one good engine per model variant and backend the recipe selects, each recorded by its stage."""
    wanted = [f"{v}.{b}" for b in recipe.engine.selected for v in MODEL_VARIANTS]
    if sorted(raw) != sorted(wanted):
        raise CheckError(f"{manifest}: engines {sorted(raw)} are not the ones the recipe asks for {sorted(wanted)}")
    engines = {}
    for name in wanted:
        where = f"{manifest}: engines.{name}"
        entry = _expect(raw[name], dict, where)
        variant, backend = name.split(".", 1)
        if entry.get("backend") != backend:
            raise CheckError(f"{where}.backend = {entry.get('backend')!r}, expected {backend!r}")
        if entry.get("good") is not True:
            raise CheckError(f"{where}: not marked good; the engine is not served")
        for key, stage in (("path", "engine"), ("goldens", "validate")):
            inside(root, entry.get(key), f"{where}.{key}")
            if entry[key] not in stages[stage].files:
                raise CheckError(f"{where}.{key} = {entry[key]!r} is not a file the {stage} stage recorded")
        engines[name] = EngineEntry(name, variant, backend, root / entry["path"], root / entry["goldens"])
    return engines
