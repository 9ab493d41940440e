"""Reading checkpoint files without running code from them.

Every ``torch.load`` in the project goes through :func:`torch_load` (``weights_only=True`` with the
short allow-list below, no fallback); DeepSpeed's own loads run under :func:`weights_only_loads`, and
DCP's pickled ``.metadata`` is checked by :func:`check_dcp_metadata` before torch reads it.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import pickle
import re
import sys
import warnings
from collections.abc import Iterator
from typing import Any

import torch

# Non-tensor objects that checkpoints we read are known to hold, and nothing else:
#   argparse.Namespace   the `args` of official VideoMAE / VideoMAE V2 / EVEREST checkpoints
#   numpy array pieces   numpy's RNG state in this project's rank_*.pt files
#   DeepSpeed classes    loss scaler, ZeRO stage enum, fragment addresses in DeepSpeed optimizer shards
_DEEPSPEED_GLOBALS = (
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
    ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
    ("deepspeed.utils.tensor_fragment", "fragment_address"),
)


class UnsafeFileError(ValueError):
    """A file that is not a checkpoint, or whose unpickling would need code outside the allow-list."""


@functools.cache
def _allowed(with_deepspeed: bool) -> tuple[Any, ...]:
    import importlib

    import numpy as np

    core = np._core if hasattr(np, "_core") else np.core
    out: list[Any] = [argparse.Namespace, core.multiarray._reconstruct, core.multiarray.scalar, np.ndarray]
    out += [np.dtype, *(getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType"))]
    for module, name in _DEEPSPEED_GLOBALS if with_deepspeed else ():
        with contextlib.suppress(ImportError, AttributeError):  # DeepSpeed files need DeepSpeed anyway
            out.append(getattr(importlib.import_module(module), name))
    return tuple(out)


def safe_globals() -> tuple[Any, ...]:
    """The allow-list passed to torch's weights-only unpickler. Its DeepSpeed classes are imported only
    for a file that holds them (importing DeepSpeed takes seconds): see :func:`torch_load`."""
    return _allowed(True)


def _reason(path: str, e: Exception) -> str:
    text = str(e)
    found = re.search(r"GLOBAL ([\w.]+)|Unsupported global: ([\w.]+)", text)
    if found:
        return (
            f"{path}: refused: reading it would call {found.group(1) or found.group(2)}, which can run "
            "code; only tensors, containers and the types in mats_scale.safe_load.safe_globals() are read"
        )
    if "Weights only load failed" in text:  # an opcode torch's reader does not take: a plain pickle
        return f"{path}: not a checkpoint written by torch.save (a plain pickle or another format)"
    first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
    return f"{path}: not a PyTorch checkpoint ({first[:160]})"


_torch_load = torch.load  # the real one, also while weights_only_loads() patches torch.load


def _load(path: str | os.PathLike, map_location: Any, allowed: tuple[Any, ...]) -> Any:
    with torch.serialization.safe_globals(list(allowed)), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "Detected pickle protocol 4": refused anyway
        return _torch_load(path, map_location=map_location, weights_only=True)


_LOAD_ERRORS = (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError, KeyError)


def torch_load(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """``torch.load`` that never executes code from the file; UnsafeFileError in one line otherwise.
    DeepSpeed's few allowed classes join the allow-list when DeepSpeed is loaded or the file names one."""
    with_deepspeed = "deepspeed" in sys.modules
    try:
        try:
            return _load(path, map_location, _allowed(with_deepspeed))
        except _LOAD_ERRORS as e:
            if with_deepspeed or not any(f"{m}.{n}" in str(e) for m, n in _DEEPSPEED_GLOBALS):
                raise
            return _load(path, map_location, _allowed(True))
    except _LOAD_ERRORS as e:
        raise UnsafeFileError(_reason(str(path), e)) from None


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Make third-party ``torch.load`` calls (DeepSpeed's checkpoint engine, zero_to_fp32) weights-only."""

    def patched(f, map_location=None, *args, weights_only=None, **kwargs):
        return torch_load(f, map_location=map_location)

    torch.load = patched
    try:
        yield
    finally:
        torch.load = _torch_load


_DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")
_DCP_OTHER = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
}


class _DcpUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        # DCP's metadata classes (not its functions), a few plain types, and torch dtypes.
        dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if (module, name) in _DCP_OTHER or dtype:
            return super().find_class(module, name)
        if module in _DCP_MODULES and isinstance(obj := super().find_class(module, name), type):
            return obj
        raise pickle.UnpicklingError(f"Unsupported global: {module}.{name}")


def check_dcp_metadata(directory: str | os.PathLike) -> None:
    """Unpickle every ``.metadata`` under `directory` with an allow-list before DCP (plain pickle) does."""
    for root, _, files in os.walk(directory):
        if ".metadata" in files:
            path = os.path.join(root, ".metadata")
            try:
                with open(path, "rb") as f:
                    _DcpUnpickler(f).load()
            except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
                raise UnsafeFileError(_reason(path, e)) from None
