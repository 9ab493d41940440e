"""What the config tree looks like to a user: every key with its default and docstring, and the
nearest keys to a mistyped one. Generated from the dataclasses of :mod:`mats_scale.config` (their
attribute docstrings are read from the source with ``ast``), so it can never drift from them.
Torch-free: the launchers use it before any heavy import.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import textwrap
from functools import lru_cache
from typing import Any, NamedTuple

from mats_scale.errors import ConfigError


class KeyInfo(NamedTuple):
    section: str
    key: str  # dotted: section.field
    default: Any
    doc: str


def _attribute_docs(cls: type) -> dict[str, str]:
    """{field: docstring} of a dataclass: the string literal right after each annotated field."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):  # no source (frozen app): keys are still listed, without docs
        return {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, nxt in zip(body, body[1:], strict=False):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


@lru_cache(maxsize=4)
def config_keys(root: type) -> tuple[KeyInfo, ...]:
    """Every leaf key of the config tree `root` (:class:`mats_scale.config.Config`, passed in by the
    caller: the config itself uses these helpers, so this module must not import it), section by
    section, in source order."""
    out = []
    for sec in dataclasses.fields(root):
        cls = sec.default_factory  # type: ignore[misc]
        docs = _attribute_docs(cls)
        for f in dataclasses.fields(cls):
            out.append(KeyInfo(sec.name, f"{sec.name}.{f.name}", _default(f), docs.get(f.name, "")))
    return tuple(out)


def _fmt(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return value if value else "''"
    if isinstance(value, list):
        return "[" + ",".join(map(_fmt, value)) + "]"
    return str(value)


def keys_help(root: type, width: int = 110) -> str:
    """Every key grouped by section: ``key = default``, then its docstring indented, wrapped to `width`."""
    lines, section = [], None
    for k in config_keys(root):
        if k.section != section:
            section = k.section
            lines.append(f"\n{section}:")
        lines.append(f"  {k.key} = {_fmt(k.default)}")
        lines += ["      " + line for line in textwrap.wrap(k.doc, width - 6)]
    return "\n".join(lines).lstrip("\n")


# Command-line names of VideoMAE / VideoMAE V2 (run_mae_pretraining.py) and what they are here.
VIDEOMAE_FLAGS = {
    "data_path": "data.train_list",
    "data_root": "data.root",
    "batch_size": "data.batch_size",
    "num_frames": "model.num_frames",
    "sampling_rate": "data.sampling_rate",
    "input_size": "model.img_size",
    "num_sample": "data.num_sample",
    "mask_ratio": "masking.ratio",
    "mask_type": "masking.strategy",
    "decoder_mask_ratio": "masking.decoder_ratio",
    "decoder_mask_type": "masking.decoder",
    "lr": "optim.base_lr",
    "min_lr": "optim.min_lr",
    "warmup_epochs": "optim.warmup_epochs",
    "warmup_steps": "optim.warmup_steps",
    "weight_decay": "optim.weight_decay",
    "opt_betas": "optim.betas",
    "clip_grad": "optim.clip_grad",
    "epochs": "train.epochs",
    "output_dir": "train.out_dir",
    "log_dir": "train.out_dir",
    "seed": "train.seed",
    "resume": "train.resume",
    "num_workers": "data.num_workers",
    "drop_path": "model.drop_path",
    "decoder_depth": "model.decoder_depth",
    "model": "model.size",
    "with_checkpoint": "parallel.checkpoint_encoder_every",
    "tubelet_size": "model.tubelet_size",
}


def suggest(name: str, root: type, n: int = 3) -> list[str]:
    """Keys a user probably meant by `name` (a dotted key, a bare field name or a VideoMAE flag):
    the VideoMAE equivalent, the same field in another section, else the closest spellings (only
    those about as close as the best one, so a clear typo gets one answer)."""
    keys = [k.key for k in config_keys(root)]
    name = name.strip().lstrip("-").replace("-", "_")
    leaf = name.rsplit(".", 1)[-1]
    exact = ([VIDEOMAE_FLAGS[name]] if name in VIDEOMAE_FLAGS else []) + [
        k for k in keys if k.rsplit(".", 1)[-1] == leaf and k != name
    ]
    if exact:
        return list(dict.fromkeys(exact))[:n]

    def score(k: str) -> float:
        full = difflib.SequenceMatcher(None, name, k).ratio()
        part = difflib.SequenceMatcher(None, leaf, k.rsplit(".", 1)[-1]).ratio()
        return max(full, part if "." not in name or name.split(".")[0] == k.split(".")[0] else part - 0.1)

    ranked = sorted(((score(k), k) for k in keys), reverse=True)
    best = ranked[0][0]
    return [k for s, k in ranked if s >= 0.75 and s >= best - 0.04][:n]


def unknown_key_message(key: str, root: type) -> str:
    """``optim.baselr: unknown key; did you mean optim.base_lr?`` (the suggestion only when one is near)."""
    near = suggest(key, root)
    return f"{key}: unknown key" + (
        f"; did you mean {' or '.join(near)}?" if near else "; see --help for every key"
    )


def check_override_keys(overrides, root: type) -> None:
    """Refuse a ``key=value`` whose key is not a config key, naming the whole dotted key (OmegaConf
    would name only its first unknown part) with the nearest keys."""
    keys = {k.key for k in config_keys(root)}
    sections = {k.section for k in config_keys(root)}
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if key not in keys and key not in sections:
            raise ConfigError(unknown_key_message(key, root))
