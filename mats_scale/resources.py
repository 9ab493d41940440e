"""Files shipped inside the package (STYLE.md 14): experiment configs and DeepSpeed templates.

Read through ``importlib.resources`` so an installed wheel works from any directory, exactly like a
checkout: ``--config k400_vit_b_mats_dual`` names a shipped config, ``parallel.ds_config`` defaults to
a shipped template.
"""

from __future__ import annotations

import os
from importlib.resources import files

CONFIG_DIR = "configs"
DS_CONFIG_DIR = "ds_configs"
DEFAULT_CONFIG = "default"


def _shipped(folder: str, name: str) -> str:
    # A regular (non-zip) install: the Traversable is a real path.
    return str(files("mats_scale") / folder / name)


def shipped_configs() -> list[str]:
    """Names of the shipped experiment configs (without .yaml)."""
    return sorted(
        p.name[:-5] for p in (files("mats_scale") / CONFIG_DIR).iterdir() if p.name.endswith(".yaml")
    )


def config_path(value: str) -> str | None:
    """``--config`` value -> a file: an existing path as given, else a shipped config of that name
    (``default``, ``k400_vit_b_mats_dual``, with or without ``.yaml``); None when neither exists."""
    if os.path.isfile(value):
        return value
    name = value[:-5] if value.endswith(".yaml") else value
    if os.sep not in name and name in shipped_configs():
        return _shipped(CONFIG_DIR, name + ".yaml")
    return None


def ds_template(name: str) -> str:
    """Path of a shipped DeepSpeed template (``zero2.json``)."""
    return _shipped(DS_CONFIG_DIR, name)
