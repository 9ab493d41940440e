"""One typed config tree for every entry point.

Loading follows OLMo's recipe: ``OmegaConf.structured(Config)`` -> merge a YAML file -> merge
``key=value`` dotlist overrides -> ``OmegaConf.to_object`` back into these dataclasses, whose
``__post_init__`` validates each section (and ``Config.__post_init__`` the cross-section rules).
Every problem becomes one :class:`ConfigError` line naming the key, the value and what is allowed;
:func:`mats_scale.cli.load_or_exit` prints it and exits with status 2 before any heavy import.

Builders receive only their own section (``build_pretrain_model(cfg.model)``, ...). The model section
is the model's own torch-free ``ModelArgs`` (``mats_scale/models/args.py``); token counts and masking
presets come from ``mats_scale/tokens.py``. Derived quantities (patch size of a model size, token grid,
total batch) are properties, never restated.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, get_type_hints

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from mats_scale import tokens
from mats_scale.config_sections import (
    DataConfig,
    FinetuneConfig,
    LoggingConfig,
    MaskingConfig,
    OptimConfig,
    ParallelConfig,
    TrainConfig,
)
from mats_scale.errors import ConfigError, fail
from mats_scale.models.args import IMAGENET_MEAN, IMAGENET_STD, ModelArgs
from mats_scale.resources import config_path, shipped_configs

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Config",
    "ConfigError",
    "DataConfig",
    "FinetuneConfig",
    "LoggingConfig",
    "MaskingConfig",
    "ModelConfig",
    "OptimConfig",
    "ParallelConfig",
    "TrainConfig",
    "load_config",
    "load_config_text",
]


# The model section is the model's own argument dataclass (torch-free, next to the size registry).
ModelConfig = ModelArgs


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    def __post_init__(self) -> None:
        _check_all_finite(self)  # nan / inf for any float key (the section checks compare, nan passes)
        # cross-section checks of the distributed run
        if self.parallel.backend != "deepspeed":
            if self.parallel.offload_optimizer:
                fail("parallel.offload_optimizer", True, "needs parallel.backend=deepspeed")
            if self.parallel.ds_config:
                fail("parallel.ds_config", self.parallel.ds_config, "needs parallel.backend=deepspeed")
        if self.masking.decoder == "running_cell":
            _, h, w = self.model.grid
            if h % 2 or w % 2:
                fail(
                    "model.img_size",
                    self.model.img_size,
                    f"the running cell needs an even token grid, got {h}x{w} patches",
                )
        self._check_masking_counts()

    def _check_masking_counts(self) -> None:
        # Token counts come from the one torch-free source the masking suite and profilers use.
        m = self.masking
        try:
            tokens.selection_counts(m, tokens.TokenGrid.from_model(self.model))
        except ValueError as e:
            key = "keep_ratio" if m.strategy == "mats" else "ratio"
            fail(f"masking.{key}", getattr(m, key), str(e))
        if m.frame_selection and self.model.tubelet_size != 2:
            fail(
                "masking.frame_selection",
                True,
                f"selects frame pairs, so it needs model.tubelet_size=2 (got {self.model.tubelet_size})",
            )

    def to_yaml(self) -> str:
        return OmegaConf.to_yaml(OmegaConf.structured(self))


def _check_all_finite(node: Any, prefix: str = "") -> None:
    """Refuse nan and inf in every float field (also inside lists such as optim.betas) of a config tree."""
    for f in dataclasses.fields(node):
        value, key = getattr(node, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            _check_all_finite(value, key + ".")
        elif isinstance(value, float) and not math.isfinite(value):
            fail(key, value, "must be a finite number")
        elif isinstance(value, (list, tuple)) and not all(
            math.isfinite(v) for v in value if isinstance(v, float)
        ):
            fail(key, list(value), "every element must be a finite number")


def _char_at(path: str, index: int) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read(index + 1)[index:]
    except OSError:
        return ""


def _load_yaml(path: str) -> Any:
    """OmegaConf.load with a YAML syntax error as one line: file, line, column (1-based), what is wrong."""
    try:
        return OmegaConf.load(path)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "somewhere"
        what = e.problem or e.context or "invalid YAML"
        if mark is not None and _char_at(path, mark.index) == "\t":
            what += " (a tab: YAML indents with spaces)"
        raise ConfigError(f"--config={path!r}: YAML syntax error at {where}: {what}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"--config={path!r}: not valid YAML ({str(e).splitlines()[0]})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"--config={path!r}: not a text file ({e.reason} at byte {e.start})") from None
    except OSError as e:  # unreadable, or (OmegaConf.load) a top level that is neither mapping nor list
        if "Invalid loaded object type" in str(e):
            raise ConfigError(f"--config={path!r}: {_TOP_LEVEL}, got a single value") from None
        raise ConfigError(f"--config={path!r}: cannot read it ({e.strerror or e})") from None


_TOP_LEVEL = (
    "the top level must be a mapping of sections ("
    + ", ".join(f"{f.name}:" for f in dataclasses.fields(Config))
    + ")"
)


def _check_sections(layer: Any, where: str) -> None:
    """Refuse a YAML layer that is not a mapping of sections, or a section that is not a mapping
    (``model: debug``), naming `where` (the file) and what is expected."""
    if not OmegaConf.is_dict(layer):
        raise ConfigError(f"{where}: {_TOP_LEVEL}, got a list")
    tree = OmegaConf.to_container(layer, resolve=False)
    for section in dataclasses.fields(Config):
        value = tree.get(section.name, {})
        if isinstance(value, dict):
            continue
        keys = dataclasses.fields(section.default_factory)
        if isinstance(value, (str, int, float, bool)):
            key, example = keys[0].name, value  # model: debug -> model: {size: debug}
        else:
            key, example = next(
                (k.name, k.default) for k in keys if k.default not in ("", dataclasses.MISSING)
            )
        got = (
            "nothing (null)"
            if value is None
            else f"a list {value!r}"
            if isinstance(value, list)
            else repr(value)
        )
        raise ConfigError(
            f"{where}: {section.name}: must be a mapping of {section.name}.* keys, e.g. "
            f"'{section.name}: {{{key}: {example}}}', got {got}"
        )


def _field_type(key: str) -> Any:
    """The annotated type of dotted config key `key` (``finetune.init`` -> str), None if no such key."""
    node: Any = Config
    for part in key.split("."):
        if not (isinstance(node, type) and dataclasses.is_dataclass(node)):
            return None
        node = get_type_hints(node).get(part)
    return node


def _dotlist(overrides: Sequence[str]) -> Any:
    """OmegaConf.from_dotlist, except that an empty value of a ``str`` key (``finetune.init=``, which
    is what the shell leaves of ``finetune.init=""``) is the empty string; OmegaConf reads it as None,
    which only an Optional key accepts (and keeps)."""
    layer = OmegaConf.from_dotlist(list(overrides))
    for item in overrides:
        key, value = item.split("=", 1)
        if not value.strip() and _field_type(key.strip()) is str:
            OmegaConf.update(layer, key.strip(), "", merge=False)
    _check_sections(layer, "key=value overrides")  # model=debug
    return layer


def load_config(path: str | None = None, overrides: Sequence[str] = (), *, text: str | None = None) -> Config:
    """Defaults <- YAML file (or the YAML `text` a run recorded) <- ``key=value`` overrides, validated.
    Raises :class:`ConfigError`."""
    from mats_scale.config_help import check_override_keys

    merged = OmegaConf.structured(Config)
    try:
        layers = []
        if path:
            found = config_path(path)
            if found is None:
                raise ConfigError(
                    f"--config={path!r}: no such file, nor a shipped config "
                    f"(shipped: {', '.join(shipped_configs())})"
                )
            layers.append(_load_yaml(found))
            _check_sections(layers[-1], f"--config={path!r}")
        if text is not None:
            layers.append(OmegaConf.create(text))
            _check_sections(layers[-1], "the recorded config")
        for item in overrides:
            if "=" not in item or item.startswith("="):
                raise ConfigError(f"override {item!r}: expected key=value, e.g. model.size=S")
        check_override_keys(overrides, Config)  # names the whole key and the nearest ones
        layers.append(_dotlist(overrides))
        for layer in layers:
            merged = _merge_layer(merged, layer)
        return OmegaConf.to_object(merged)
    except ConfigKeyError as e:
        from mats_scale.config_help import unknown_key_message

        raise ConfigError(unknown_key_message(e.full_key, Config)) from None
    except (ValidationError, OmegaConfBaseException) as e:  # wrong type, bad YAML structure, ...
        key = getattr(e, "full_key", None) or "config"
        raise ConfigError(f"{key}: {str(e.msg).splitlines()[0]}") from None


def _merge_layer(merged: DictConfig, layer: DictConfig) -> DictConfig:
    """`layer` (the file, then the overrides) over `merged`, with masking presets resolved per layer: a
    layer's ``masking.preset`` replaces the strategy/decoder keys of the layers below it (its own keys
    of the same names must agree: MaskingConfig refuses a contradiction within one layer), and a layer
    that sets one of those keys to another value than a lower layer's preset drops that preset."""
    preset = OmegaConf.select(layer, "masking.preset", default=None)
    if preset:
        if preset in tokens.PRESETS:
            merged = OmegaConf.merge(merged, {"masking": tokens.PRESETS[preset]})
        return OmegaConf.merge(merged, layer)
    below = OmegaConf.select(merged, "masking.preset", default="")
    merged = OmegaConf.merge(merged, layer)
    if below in tokens.PRESETS and preset is None:
        fields = tokens.PRESETS[below]
        if any(OmegaConf.select(merged, f"masking.{k}") != v for k, v in fields.items()):
            merged.masking.preset = ""
    return merged


def load_config_text(text: str) -> Config:
    """A Config from the YAML a run recorded (``config.yaml``, a checkpoint's ``meta.json``)."""
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(text)))
