"""DeepSpeed JIT-compiles some C++ ops the first time they are used (``deepspeed_shm_comm`` for CPU
collectives, ``cpu_adam`` for optimizer offload), which takes a minute or more without any output:
:func:`first_build_notice` says so beforehand when an op is not in torch's extension cache yet."""

from __future__ import annotations

import glob
import os


def extensions_root() -> str:
    from torch.utils.cpp_extension import get_default_build_root

    return os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()


def ops_to_build(offload_optimizer: bool) -> list[str]:
    """Names of the ops this run's DeepSpeed will JIT-load (the ones it can build here)."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    names = []
    wanted = ["ShareMemCommBuilder"] + (["CPUAdamBuilder"] if offload_optimizer else [])
    for builder_name in wanted:
        try:
            builder = get_accelerator().create_op_builder(builder_name)
        except Exception:  # noqa: BLE001 - an accelerator without this op
            builder = None
        if builder is not None and deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
            names.append(builder.NAME)
    return names


def first_build_notice(names: list[str], root: str | None = None) -> str | None:
    """A line announcing the compilation of the ops of `names` that are not built under `root`."""
    root = root or extensions_root()
    # TORCH_EXTENSIONS_DIR/<name>/ when that is set, else <default root>/py311_cpu/<name>/.
    missing = [
        n
        for n in names
        if not (
            glob.glob(os.path.join(root, n, f"{n}*.so")) or glob.glob(os.path.join(root, "*", n, f"{n}*.so"))
        )
    ]
    if not missing:
        return None
    ops = f"{', '.join(missing)} op{'s' if len(missing) > 1 else ''}"
    return (
        f"DeepSpeed compiles its {ops} now (first launch "
        f"only; a minute or more without output); the build is cached in {root}"
    )
