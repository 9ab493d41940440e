"""Run-level fault handling kept out of the step loop: the run directory is usable before anything is
built, and a bad-data stop agreed by all ranks ends with a checkpoint and one report."""

from __future__ import annotations

import os
import sys
import tempfile
from typing import TYPE_CHECKING

from mats_scale.config import ConfigError
from mats_scale.data.errors import DataError
from mats_scale.parallel.distributed import all_gather_object, barrier

if TYPE_CHECKING:
    from mats_scale.train.loop import Trainer


def check_out_dir(path: str) -> None:
    """Create `path` (and its parents) and write a probe file in it; one :class:`ConfigError` line when
    that is impossible (read-only file system, a parent that is a file, no permission), so the run
    stops before any process group, model or data worker exists."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as e:
        other = e.filename and os.path.abspath(e.filename) != os.path.abspath(path)
        where = f" ({e.filename})" if other else ""
        raise ConfigError(
            f"train.out_dir={path!r}: cannot create or write it: {e.strerror}{where}; "
            "choose a writable directory"
        ) from None


class DataStop(DataError):
    """Too many bad videos on some rank; every rank raises it after the shared checkpoint and rank 0's
    report (already printed: the launcher must not see a rank exit before rank 0 has said why)."""


def stop_on_bad_data(trainer: Trainer, step: int) -> None:
    """All ranks agreed (in the step's all-reduce) that a rank hit the bad-file limit: save a checkpoint,
    gather every rank's report to rank 0 and raise :class:`DataStop` on all ranks."""
    trainer.save()
    mine = trainer.stream.stop_error
    reports = all_gather_object(str(mine) if mine is not None else None)
    listed = "\n".join(
        f"[rank {r}] {text}" if len(reports) > 1 else text for r, text in enumerate(reports) if text
    )
    message = (
        f"step {step}: stopping on bad training data (update of this step skipped); saved "
        f"{trainer.ckpt.latest()}; fix or remove the files, or raise data.max_bad_fraction, then "
        f"resume with train.resume=auto\n{listed}"
    )
    if trainer.env.is_writer:
        print(f"error: {message}", file=sys.stderr, flush=True)
    barrier()  # no rank exits (and makes the launcher kill the others) before the report is out
    raise DataStop(message)
