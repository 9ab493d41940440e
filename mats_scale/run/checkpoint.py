"""Atomic, verified, resumable checkpoints under ``<out_dir>/checkpoints``: written to a temp directory,
renamed, then pointed at by ``latest``; verified against their manifest before loading; never deleted
or overwritten unless this run wrote them (docs/distributed.md, "Checkpoints and resume")."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import random
import re
import shutil
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mats_scale.parallel.distributed import DistEnv, all_gather_object, any_rank, barrier, broadcast_object
from mats_scale.safe_load import torch_load

POINTER = "latest"
META = "meta.json"
MANIFEST = "manifest.json"
_NAME = re.compile(r"^step_(\d{8})$")
log = logging.getLogger("mats_scale.train")


class CheckpointError(RuntimeError):
    """A checkpoint that can not be used (missing, damaged, incomplete, from another configuration),
    or one that could not be written; the message is one line naming the path and the problem."""


def capture_rng(mask_generator: torch.Generator) -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "mask": mask_generator.get_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict[str, Any], mask_generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    mask_generator.set_state(state["mask"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(dirpath))


# ---- manifest: what was written, and checking it --------------------------------------------------
def _files(ckpt: Path) -> list[str]:
    """Relative paths of the files in a checkpoint directory except the manifest, sorted."""
    out = []
    for dirpath, _, names in os.walk(ckpt):
        for name in names:
            rel = os.path.relpath(os.path.join(dirpath, name), ckpt)
            if rel != MANIFEST:
                out.append(rel)
    return sorted(out)


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def digest_files(ckpt: Path, rels: list[str]) -> dict[str, dict[str, Any]]:
    """{rel: {"size", "sha256"}} of `rels` under `ckpt`, hashed on a few threads (hashlib frees the GIL)."""

    def one(rel: str) -> tuple[str, dict[str, Any]]:
        path = ckpt / rel
        return rel, {"size": path.stat().st_size, "sha256": _sha256(path)}

    with ThreadPoolExecutor(max_workers=max(1, min(8, len(rels), os.cpu_count() or 1))) as pool:
        return dict(pool.map(one, rels))


def _read_manifest(ckpt: Path) -> tuple[dict | None, str | None]:
    """(manifest, None), (None, None) for a checkpoint written before manifests, or (None, problem)."""
    path = ckpt / MANIFEST
    if not path.is_file():
        if (ckpt / META).is_file():
            return None, None  # legacy: checked only by loading it
        return None, "not a complete mats-scale checkpoint (no manifest.json or meta.json)"
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        assert isinstance(files, dict) and all("size" in v and "sha256" in v for v in files.values())
    except (OSError, ValueError, KeyError, TypeError, AssertionError):
        return None, "manifest.json is unreadable"
    return manifest, None


def check_sizes(ckpt: Path, manifest: dict) -> str | None:
    """The first missing or truncated file (cheap: no reading), or None."""
    for rel, want in sorted(manifest["files"].items()):
        path = ckpt / rel
        if not path.is_file():
            return f"{rel} is missing"
        size = path.stat().st_size
        if size != want["size"]:
            return f"{rel} has {size} bytes, {want['size']} were written"
    return None


def compare_digests(manifest: dict, digests: dict[str, dict[str, Any]]) -> str | None:
    for rel in sorted(digests):
        if digests[rel]["sha256"] != manifest["files"][rel]["sha256"]:
            return f"{rel} does not match its checksum (changed after it was written)"
    return None


def verify_checkpoint(ckpt: Path) -> str | None:
    """The problem with checkpoint directory `ckpt` in a few words, or None when it verifies (one process)."""
    if not ckpt.is_dir():
        return "no such directory"
    manifest, problem = _read_manifest(ckpt)
    if manifest is None:
        return problem if problem is not None else _check_legacy_meta(ckpt)
    problem = check_sizes(ckpt, manifest)
    if problem is not None:
        return problem
    return compare_digests(manifest, digest_files(ckpt, sorted(manifest["files"])))


def _check_legacy_meta(ckpt: Path) -> str | None:
    try:
        json.loads((ckpt / META).read_text())
    except (OSError, ValueError):
        return "meta.json is unreadable (checkpoint written before manifests)"
    return None


def read_meta(ckpt: Path) -> dict[str, Any]:
    try:
        return json.loads((ckpt / META).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{ckpt}: meta.json is unreadable ({type(e).__name__})") from None


def step_dirs(root: Path) -> list[Path]:
    """``step_*`` directories under `root`, newest (highest step) first."""
    if not root.is_dir():
        return []
    return sorted(
        (p for p in root.iterdir() if _NAME.match(p.name) and p.is_dir()), key=lambda p: p.name, reverse=True
    )


def newest_verified(root: Path) -> tuple[Path | None, list[str]]:
    """(newest checkpoint under `root` that verifies, ['step_N: problem' for each newer damaged one])."""
    damaged = []
    for ckpt in step_dirs(root):
        problem = verify_checkpoint(ckpt)
        if problem is None:
            return ckpt, damaged
        damaged.append(f"{ckpt.name}: {problem}")
    return None, damaged


def resumable_checkpoint(train) -> Path | None:
    """The checkpoint ``train.resume`` points at (``auto``: the newest step_* of train.out_dir), or None
    for a fresh start. Read-only and cheap (no digests): with step_* present the Trainer either resumes
    one that verifies or refuses to start, so the answer "this run resumes" holds either way."""
    if train.resume in ("none", "restart"):
        return None
    if train.resume != "auto":
        return Path(train.resume)
    dirs = step_dirs(Path(train.out_dir) / "checkpoints")
    return dirs[0] if dirs else None


def _save_failure(e: BaseException, path: Path) -> str:
    """A few words on why writing under `path` failed; names a full disk when that is the cause."""
    try:
        free = shutil.disk_usage(path if path.exists() else path.parent).free
    except OSError:
        free = None
    full = isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)
    if full or (free is not None and free < 1 << 20):
        return f"no space left on the device of {path.parent}"
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text[:200]}"


class CheckpointManager:
    def __init__(
        self, out_dir: str, keep_last: int, env: DistEnv, on_save: Callable[[int], None] = lambda step: None
    ) -> None:
        self.root = Path(out_dir) / "checkpoints"
        self.keep_last, self.env = keep_last, env
        self.on_save = on_save  # fault-injection hook, called mid-save
        self.run_id: str | None = None  # set by resolve(): the run's lineage, stored in meta.json
        self.damaged: set[str] = set()  # names found damaged by resolve(): never pruned
        self.notes: list[str] = []  # what resolve() found and did, for the run log

    # ---- finding -------------------------------------------------------------------------
    def latest(self) -> Path | None:
        """The checkpoint the pointer names, else the newest step_* directory, else None (no checks)."""
        pointer = self.root / POINTER
        if pointer.is_file():
            path = self.root / pointer.read_text().strip()
            if path.is_dir():
                return path
        dirs = step_dirs(self.root)
        return dirs[0] if dirs else None

    def _verify(self, ckpt: Path) -> str | None:
        """verify_checkpoint with the hashing shared by all ranks (collective; same answer everywhere)."""
        problem = None
        manifest = None
        if self.env.is_writer:
            if not ckpt.is_dir():
                problem = "no such directory"
            else:
                manifest, problem = _read_manifest(ckpt)
                if manifest is None and problem is None:
                    problem = _check_legacy_meta(ckpt)
                elif manifest is not None:
                    problem = check_sizes(ckpt, manifest)
        problem, manifest = broadcast_object((problem, manifest))
        if problem is not None or manifest is None:
            return problem
        rels = sorted(manifest["files"])
        mine = digest_files(ckpt, rels[self.env.rank :: self.env.world_size])
        problems = [compare_digests(manifest, d) for d in all_gather_object(mine)]
        return next((p for p in problems if p is not None), None)

    def resolve(self, resume: str) -> Path | None:
        """train.resume -> the checkpoint to load, or None to start fresh (collective).

        Sets :attr:`run_id` (the resumed checkpoint's, or a new one) and :attr:`notes`.
        """
        path = self._resolve(resume)
        run_id = None
        if path is not None and self.env.is_writer:
            run_id = read_meta(path).get("run_id")
        if run_id is None and self.env.is_writer:
            run_id = uuid.uuid4().hex
        self.run_id = broadcast_object(run_id)
        return path

    def _resolve(self, resume: str) -> Path | None:
        if resume == "restart":
            self._move_all_aside()
            return None
        existing = broadcast_object([p.name for p in step_dirs(self.root)] if self.env.is_writer else None)
        pointer = self.root / POINTER
        if resume == "none":
            if existing or pointer.is_file():
                what = (
                    ", ".join(existing[:3]) + (", ..." if len(existing) > 3 else "") or f"{pointer.name} only"
                )
                raise CheckpointError(
                    f"train.out_dir={str(self.root.parent)!r} already holds checkpoints "
                    f"({what}); continue with train.resume=auto, start over with "
                    "train.resume=restart (they are moved aside, not deleted), or choose "
                    "another train.out_dir"
                )
            return None
        if resume == "auto":
            return self._newest_good(existing)
        path = Path(resume)
        problem = self._verify(path)
        if problem is not None:
            raise CheckpointError(f"train.resume={resume!r}: cannot resume from it: {problem}")
        return path

    def _newest_good(self, existing: list[str]) -> Path | None:
        pointer = self.root / POINTER
        named = pointer.read_text().strip() if pointer.is_file() else None
        if not existing:
            if named is not None:
                self.notes.append(
                    f"{pointer} names {named}, which does not exist, and there is no other "
                    "checkpoint: starting fresh"
                )
            return None
        if named is None:
            self.notes.append(f"{pointer} is missing: looking for the newest checkpoint that verifies")
        elif named not in existing:
            self.notes.append(
                f"{pointer} names {named}, which does not exist: looking for the newest "
                "checkpoint that verifies"
            )
        for i, name in enumerate(existing):
            problem = self._verify(self.root / name)
            if problem is None:
                if i or named != name:
                    self.notes.append(f"resuming from {name}, the newest checkpoint that verifies")
                return self.root / name
            self.damaged.add(name)
            self.notes.append(f"checkpoint {self.root / name} is damaged: {problem}; skipped (kept on disk)")
        raise CheckpointError(
            f"no checkpoint in {self.root} verifies ({len(existing)} damaged, newest "
            f"{existing[0]}: see above); they are kept: repair or move them, or start over "
            "with train.resume=restart"
        )

    def _move_all_aside(self) -> None:
        """train.resume=restart: the old checkpoints go to a sibling directory, never deleted."""
        target = None
        if self.env.is_writer and self.root.is_dir() and any(self.root.iterdir()):
            stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
            target = self.root.with_name(f"{self.root.name}.before-restart-{stamp}")
            k = 1
            while target.exists():
                k += 1
                target = self.root.with_name(f"{self.root.name}.before-restart-{stamp}-{k}")
            os.rename(self.root, target)
        target = broadcast_object(str(target) if target else None)
        if target:
            self.notes.append(f"train.resume=restart: the previous checkpoints were moved to {target}")

    # ---- saving --------------------------------------------------------------------------
    def save(self, step: int, engine, rank_state: dict[str, Any], meta: dict[str, Any]) -> Path:
        """Write checkpoint `step` (collective). Each phase ends in a vote, so a rank that fails (a full
        disk) makes every rank stop with :class:`CheckpointError` instead of leaving them waiting."""
        name = f"step_{step:08d}"
        tmp, final = self.root / f".tmp-{name}", self.root / name
        writer = self.env.is_writer

        def start() -> None:
            if writer:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)

        def write() -> None:
            engine.save(str(tmp / "engine"))
            torch.save(rank_state, tmp / f"rank_{self.env.rank:05d}.pt")
            self.on_save(step)

        def describe() -> None:
            if writer:
                record = {**meta, "step": step, "run_id": self.run_id}
                (tmp / META).write_text(json.dumps(record, indent=2, sort_keys=True))

        self._phase(start, name, tmp)
        self._phase(write, name, tmp)
        self._phase(describe, name, tmp)
        rels = broadcast_object(_files(tmp) if writer else None)
        digests: list[dict] = []
        self._phase(
            lambda: digests.append(digest_files(tmp, rels[self.env.rank :: self.env.world_size])), name, tmp
        )
        gathered = all_gather_object(digests[0])

        def publish() -> None:
            if writer:
                files = {k: v for part in gathered for k, v in part.items()}
                manifest = {"format": 1, "step": step, "files": files}
                (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
                self._publish(tmp, final, name)

        self._phase(publish, name, tmp)
        return final

    def _phase(self, fn: Callable[[], None], name: str, tmp: Path) -> None:
        """Run one phase of a save; all ranks agree whether it failed anywhere, and then all stop."""
        failure = None
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - every rank must learn of it, or the others wait forever
            failure = e
        if not any_rank(failure is not None, self.env.device):
            return
        barrier()  # every rank is done writing before the writer removes the directory
        if self.env.is_writer:
            shutil.rmtree(tmp, ignore_errors=True)
        last = self.latest()
        why = _save_failure(failure, tmp) if failure is not None else "it failed on another rank"
        raise CheckpointError(
            f"saving checkpoint {name} failed: {why}; removed the half-written {tmp.name}; "
            f"last good checkpoint: {last if last else 'none'}"
        )

    def _publish(self, tmp: Path, final: Path, name: str) -> None:
        _fsync_tree(tmp)
        if final.exists():  # another run's, a damaged one, or one never pointed at: keep it, renamed
            aside = self._aside(final)
            os.rename(final, aside)
            self.damaged.discard(final.name)  # the name now holds this run's good checkpoint
            log.warning(f"{final} existed (not written by this run): moved to {aside.name}, not deleted")
        os.rename(tmp, final)
        _fsync_dir(self.root)
        staged = self.root / f".{POINTER}.tmp"
        with open(staged, "w") as f:
            f.write(name)
            f.flush()
            os.fsync(f.fileno())
        os.replace(staged, self.root / POINTER)
        _fsync_dir(self.root)
        self._prune(keep=name)

    def _aside(self, path: Path) -> Path:
        label = "damaged" if path.name in self.damaged else "superseded"
        k = 1
        while path.with_name(f"{path.name}.{label}-{k}").exists():
            k += 1
        return path.with_name(f"{path.name}.{label}-{k}")

    def _prune(self, keep: str) -> None:
        """Keep the newest `keep_last` of this run's checkpoints; never touch another run's, a damaged one,
        or one newer than `keep` (written by an earlier run that went further)."""
        ours = []
        for path in step_dirs(self.root):
            if path.name >= keep or path.name in self.damaged:
                continue
            try:
                run_id = json.loads((path / META).read_text()).get("run_id")
            except (OSError, ValueError):
                continue
            if run_id == self.run_id:
                ours.append(path)
        for old in ours[max(0, self.keep_last - 1) :]:
            shutil.rmtree(old)
        for stale in self.root.glob(".tmp-step_*"):
            shutil.rmtree(stale)

    # ---- loading -------------------------------------------------------------------------
    def load(self, path: Path, engine, expect: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Check `expect` against the checkpoint's meta.json, restore the engine, and return
        (meta, this rank's trainer state). The files were verified by :meth:`resolve`."""
        meta = read_meta(path)
        for key, value in expect.items():
            if meta.get(key) != value:
                raise CheckpointError(
                    f"{path}: written with {key}={meta.get(key)!r}, this run has "
                    f"{key}={value!r}; resume with the same setting or another "
                    "train.out_dir"
                )
        try:
            engine.load(str(path / "engine"))
            state = torch_load(path / f"rank_{self.env.rank:05d}.pt")  # numpy RNG state: allow-listed
        except (OSError, RuntimeError, EOFError, ValueError, KeyError) as e:  # UnsafeFileError: ValueError
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"{path}: cannot be read ({first[:200]}); it is kept on disk") from None
        return meta, state
