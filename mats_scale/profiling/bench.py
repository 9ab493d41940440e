"""The settings of the step benchmark (``benchmarks/bench_step.py``) and the check of its shape options.

Torch-free: the checks are the project config's own, so a bad ``--size`` / ``--frames`` / ``--img``
is one line before any model is built.
"""

from __future__ import annotations

from mats_scale.config import Config, ConfigError, MaskingConfig, ModelConfig
from mats_scale.tokens import PRESETS

# The project's masking presets (mats_scale.tokens.PRESETS), plus MATS + dual with the pixel score.
SETTINGS = {
    **{name: dict(preset=name, **fields) for name, fields in PRESETS.items()},
    "mats+dual-pixel": dict(preset="mats+dual", score="pixel", **PRESETS["mats+dual"]),
}
BASELINE = "tube+rc"

SHAPE_OPTIONS = {"model.size": "--size", "model.num_frames": "--frames", "model.img_size": "--img"}


def shape_problem(size: str, frames: int, img: int, names: list[str]) -> str | None:
    """One line on what is wrong with --size / --frames / --img (alone, or with a setting's masking),
    by the project config's own checks; None when every setting can run."""

    def message(e: ConfigError, where: str = "") -> str:
        key, _, rest = str(e).partition("=")  # model.img_size=100: ... -> --img 100: ...
        if key in SHAPE_OPTIONS:
            rest = rest.replace("model.tubelet_size=", "the tubelet size ")
            return f"{SHAPE_OPTIONS[key]} {rest}{where}"
        return f"--size {size} --frames {frames} --img {img}{where}: {e}"

    try:
        model = ModelConfig(size=size, num_frames=frames, img_size=img)
    except ConfigError as e:
        return message(e)
    for name in names:
        try:
            Config(model=model, masking=MaskingConfig(**SETTINGS[name]))
        except ConfigError as e:
            return message(e, f" (with --setting {name})")
    return None
