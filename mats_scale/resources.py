"""Files shipped with the package: experiment configs, ablation grids, learning studies and DeepSpeed
templates.

Read through ``importlib.resources`` so an installed wheel works from any directory, exactly like a
checkout: ``--config k400_vit_b_mats_dual``, ``--grid mask_ratio`` and ``--study presets`` name shipped
files (:func:`config_path` finds all three), ``parallel.ds_config`` defaults to a shipped template. The
templates are the checkout's top-level ``ds_configs/``, installed as the package ``mats_scale.ds_configs``
(setup.py).
"""

from __future__ import annotations

import os
from importlib.resources import files
from pathlib import Path

from mats_scale.errors import ConfigError

CONFIG_DIR = "configs"  # experiment configs (--config NAME)
GRID_DIR = "configs/ablations"  # ablation grids (--grid NAME)
STUDY_DIR = "configs/studies"  # learning studies (--study NAME)
DEFAULT_CONFIG = "default"


def shipped_configs(folder: str = CONFIG_DIR) -> list[str]:
    """Names (without .yaml) of the YAML files shipped in the package folder `folder`."""
    return sorted(p.name[:-5] for p in (files("mats_scale") / folder).iterdir() if p.name.endswith(".yaml"))


def config_path(value: str, folder: str = CONFIG_DIR) -> str | None:
    """A ``--config`` / ``--grid`` / ``--study`` value -> a file: an existing path as given, else the
    shipped YAML file of that name in `folder` (``default``, ``k400_vit_b_mats_dual``, with or without
    ``.yaml``); None when neither exists."""
    if os.path.isfile(value):
        return value
    name = value.removesuffix(".yaml")
    if os.sep not in name and name in shipped_configs(folder):
        # A regular (non-zip) install: the Traversable is a real path.
        return str(files("mats_scale") / folder / f"{name}.yaml")
    return None


def require_config(value: str, folder: str, option: str) -> str:
    """:func:`config_path`, or a ConfigError naming `option` and listing the shipped names."""
    path = config_path(value, folder)
    if path is None:
        what = option.removeprefix("--")
        raise ConfigError(
            f"{option}={value!r}: no such file, nor a shipped {what} "
            f"(shipped: {', '.join(shipped_configs(folder))})"
        )
    return path


def ds_template(name: str) -> str:
    """Path of a shipped DeepSpeed template (``zero2.json``; ``""``: their folder)."""
    try:
        folder = files("mats_scale.ds_configs")
    except ModuleNotFoundError:  # a checkout on PYTHONPATH that was never installed (pip install -e .)
        folder = Path(__file__).resolve().parent.parent / "ds_configs"
    return str(folder / name)
