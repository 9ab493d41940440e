import subprocess
import sys
from pathlib import Path

import pytest

from mats_scale.cli import parse
from mats_scale.config import Config, ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_and_dotlist_override():
    cfg = load_config(None, [])
    assert isinstance(cfg, Config) and cfg.model.size == "B" and cfg.masking.ratio == 0.9
    cfg = load_config(None, ["model.size=S", "masking.ratio=0.75", "optim.betas=[0.9,0.999]"])
    assert cfg.model.size == "S" and cfg.masking.ratio == 0.75 and cfg.optim.betas == [0.9, 0.999]
    assert cfg.model.grid == (8, 14, 14) and cfg.model.num_tokens == 1568


def test_yaml_then_dotlist(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  size: g\n  num_frames: 16\ndata:\n  batch_size: 3\n")
    cfg = load_config(str(path), ["data.batch_size=5"])
    assert cfg.model.size == "g" and cfg.model.patch == 14 and cfg.model.num_tokens == 2048
    assert cfg.data.batch_size == 5


@pytest.mark.parametrize(
    "override,needle",
    [
        ("model.colour=red", "model.colour: unknown key"),
        ("foo.bar=1", "foo.bar: unknown key"),
        ("data.batch_size=two", "data.batch_size"),
        ("model.img_size=1.5", "model.img_size"),
        ("masking.ratio=1.2", "masking.ratio=1.2: must be in the open interval (0, 1)"),
        ("masking.ratio=0", "masking.ratio=0.0: must be in the open interval (0, 1)"),
        ("masking.keep_ratio=1.0", "masking.keep_ratio=1.0"),
        ("model.num_frames=15", "model.num_frames=15: must be divisible by model.tubelet_size=2"),
        ("model.img_size=230", "model.img_size=230: must be divisible by the patch size 16"),
        ("model.size=XL", "model.size='XL': allowed: debug, S, B, L, H, g"),
        ("masking.strategy=magic", "masking.strategy='magic': allowed: tube, random, mats"),
        ("masking.decoder_ratio=0.1", "masking.decoder_ratio"),  # only meaningful with the running cell
        ("parallel.zero_stage=4", "parallel.zero_stage=4: allowed: 0, 1, 2, 3"),
        ("data.eval_crops=2", "data.eval_crops=2: allowed: 1, 3"),
        ("data.eval_clips=0", "data.eval_clips=0"),
    ],
)
def test_bad_values_name_key_value_and_rule(override, needle):
    extra = ["masking.decoder=running_cell"] if override.startswith("masking.decoder_ratio") else []
    with pytest.raises(ConfigError) as err:
        load_config(None, [override, *extra])
    msg = str(err.value)
    assert needle in msg and "\n" not in msg


def test_img_size_checked_against_the_size_patch():
    load_config(None, ["model.size=g", "model.img_size=224"])  # 224 = 16 * 14
    with pytest.raises(ConfigError, match="must be divisible by the patch size 14"):
        load_config(None, ["model.size=g", "model.img_size=160"])


def test_running_cell_refuses_odd_grid():
    with pytest.raises(ConfigError, match="even token grid"):
        load_config(None, ["model.img_size=208", "masking.decoder=running_cell"])  # 13 x 13 patches


def test_cli_args():
    args = parse(["--config", "a.yaml", "x.y=1", "--local_rank=0"])
    assert (args.config, args.overrides) == ("a.yaml", ["x.y=1"])
    with pytest.raises(ConfigError, match="unknown option"):
        parse(["--bogus"])
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(None, ["model.size"])
    with pytest.raises(ConfigError, match="no such file"):
        load_config("/nonexistent.yaml", [])


def test_launcher_rejects_bad_config_with_one_line_and_exit_2():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "launchers" / "pretrain.py"), "masking.ratio=1.5"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines == ["config error: masking.ratio=1.5: must be in the open interval (0, 1)"]


@pytest.mark.parametrize(
    "path", sorted((ROOT / "mats_scale" / "configs").glob("*.yaml")), ids=lambda p: p.name
)
def test_every_shipped_config_loads_with_every_value_it_sets(path):
    """Every key the file sets reaches the config as written (no preset or default overrides it), and
    the loaded config survives the YAML round trip that checkpoints record."""
    import yaml

    from mats_scale.config import load_config_text

    cfg = load_config(str(path), [])
    for section, values in yaml.safe_load(path.read_text()).items():
        for key, value in values.items():
            got = getattr(getattr(cfg, section), key)
            assert (list(got) if isinstance(got, tuple) else got) == value, f"{section}.{key}"
    assert load_config_text(cfg.to_yaml()) == cfg


@pytest.mark.parametrize("preset", ["tube", "tube+rc", "mats"])
def test_a_preset_on_the_command_line_replaces_the_files_masking_keys(preset):
    """default.yaml sets masking.strategy/decoder/decoder_mode; a preset given as an override is a
    later layer and wins over them (was: exit 2, "drop one of the two")."""
    from mats_scale.tokens import PRESETS

    m = load_config("default", [f"masking.preset={preset}"]).masking
    assert m.preset == preset
    assert {k: getattr(m, k) for k in PRESETS[preset]} == PRESETS[preset]
    assert m.ratio == 0.9  # keys the preset does not name stay as the file says


def test_a_key_over_a_lower_layers_preset_wins_and_drops_the_preset(tmp_path):
    from mats_scale.config import ConfigError

    f = tmp_path / "c.yaml"
    f.write_text("masking:\n  preset: mats+dual\n")
    m = load_config(str(f), ["masking.decoder=none"]).masking
    assert (m.strategy, m.decoder, m.preset) == ("mats", "none", "")
    assert load_config(str(f), ["masking.strategy=mats"]).masking.preset == "mats+dual"
    with pytest.raises(ConfigError, match="masking.preset=tube sets strategy=tube; drop one of the two"):
        load_config(None, ["masking.preset=tube", "masking.strategy=mats"])  # one layer contradicts


@pytest.mark.integration
def test_shipped_vit_g_config_fits_one_node_per_the_planner():
    import torch

    from mats_scale.profiling.feasibility import NODES, check_config, engine_of
    from mats_scale.profiling.workload import Workload

    cfg = load_config(str(ROOT / "mats_scale" / "configs" / "k400_vit_g_mats_dual.yaml"), [])
    wl = Workload(
        cfg.model,
        cfg.masking,
        cfg.data.batch_size,
        torch.bfloat16,
        (cfg.parallel.checkpoint_encoder_every, cfg.parallel.checkpoint_decoder_every),
    )
    report = check_config(wl, engine_of(cfg.parallel), NODES["a100-80"])
    assert report["fits"], report


def _pretrain(*args: str, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "launchers" / "pretrain.py"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )


@pytest.mark.parametrize(
    "text,needle",
    [
        ("- a\n- b\n", ": the top level must be a mapping of sections (model:, masking:, "),
        ("42\n", ": the top level must be a mapping of sections"),
        (
            "model: debug\n",
            ": model: must be a mapping of model.* keys, e.g. 'model: {size: debug}', got 'debug'",
        ),
        ("masking: tube\n", ": masking: must be a mapping of masking.* keys, e.g. 'masking: {preset: tube}'"),
        (
            "model:\n",
            ": model: must be a mapping of model.* keys, e.g. 'model: {size: B}', got nothing (null)",
        ),
        ("data: [1, 2]\n", ": data: must be a mapping of data.* keys, e.g. 'data: {dataset: bundled}'"),
    ],
)
def test_a_yaml_file_of_the_wrong_shape_is_one_line_naming_the_file(tmp_path, text, needle):
    path = tmp_path / "shape.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(str(path), [])
    assert str(err.value).startswith(f"--config={str(path)!r}{needle}"), err.value
    if text == "model: debug\n":  # the example the message gives is a config that loads
        path.write_text("model: {size: debug}\n")
        assert load_config(str(path), []).model.size == "debug"
    proc = _pretrain("--config", str(path), "--print-config") if text == "- a\n- b\n" else None
    if proc is not None:  # the launcher: one line, exit 2, no traceback (was a TypeError)
        assert proc.returncode == 2 and proc.stdout == "" and "Traceback" not in proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"config error: --config={str(path)!r}: the top level")


def test_a_section_set_to_a_value_by_an_override_is_one_line():
    with pytest.raises(
        ConfigError, match=r"^key=value overrides: model: must be a mapping of model\.\* keys"
    ):
        load_config(None, ["model=debug"])
    assert load_config(None, ["model={size: debug}"]).model.size == "debug"


def test_an_empty_override_value_is_the_empty_string_for_str_keys():
    # The shell turns finetune.init="" into finetune.init= , which OmegaConf reads as None.
    cfg = load_config(None, ["finetune.init=", "finetune.rand_aug=", "parallel.ds_config="])
    assert (cfg.finetune.init, cfg.finetune.rand_aug, cfg.parallel.ds_config) == ("", "", "")
    assert load_config(None, ['finetune.init=""']).finetune.init == ""
    # An Optional key keeps None; a non-str key still refuses an empty value.
    assert load_config(None, ["train.epochs="]).train.epochs is None
    with pytest.raises(ConfigError, match="model.num_frames"):
        load_config(None, ["model.num_frames="])
    # The README's random-encoder probe command line (finetune.init="" after the shell).
    proc = subprocess.run(
        [sys.executable, str(ROOT / "launchers" / "finetune.py"), "--probe", "parallel.backend=none"]
        + ["finetune.init=", "--print-config"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr
    assert "  init: ''\n" in proc.stdout and "  linear_probe: true\n" in proc.stdout
