"""Loading a checkpoint never runs code from it: crafted pickles are refused in one line and the
command they carry never runs; the non-tensor objects of official and of this project's files load."""

from __future__ import annotations

import argparse
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from mats_scale.models.load import InitError
from mats_scale.safe_load import UnsafeFileError, check_dcp_metadata, torch_load, weights_only_loads
from mats_scale.train.export import read_weights


class WritesAFile:
    """Unpickling this calls os.system: it would create `marker`."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(params=["torch.save", "pickle"])
def crafted(request, tmp_path):
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.pt"
    payload = {"model": {"w": torch.zeros(2)}, "args": WritesAFile(str(marker))}
    if request.param == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    return path, marker


def test_a_crafted_pickle_is_refused_without_running_its_code(crafted):
    path, marker = crafted
    with pytest.raises(InitError) as e:
        read_weights(str(path))
    msg = str(e.value)
    assert msg.startswith(f"finetune.init={path}: ") and "\n" not in msg
    assert "system" in msg or "not a checkpoint written by torch.save" in msg
    assert not marker.exists()


def test_the_finetune_launcher_and_visualize_refuse_it_in_one_line(crafted, tmp_path, capsys):
    from mats_scale.launch.finetune import main as finetune_main
    from mats_scale.launch.visualize import main as visualize_main

    path, marker = crafted
    args = ["--eval", "data.dataset=bundled", f"data.root={tmp_path / 'data'}", "parallel.backend=none"]
    code = finetune_main([*args, f"finetune.init={path}", f"train.out_dir={tmp_path / 'o'}"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and err.count("\n") == 1 and str(path) in err
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  size: debug\n")
    code = visualize_main([str(path), "--config", str(cfg), "--out", str(tmp_path / "v.png")])
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err and err.count("\n") == 1 and str(path) in err
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"garbage\n", b"", b"PK\x03\x04 truncated zip"])
def test_a_file_that_is_not_a_checkpoint_gets_one_line(tmp_path, content):
    path = tmp_path / "x.pt"
    path.write_bytes(content)
    with pytest.raises(InitError) as e:
        read_weights(str(path))
    assert str(e.value).startswith(f"finetune.init={path}: ") and "\n" not in str(e.value)


def test_official_layout_with_argparse_args_and_numpy_values_loads(tmp_path):
    """VideoMAE / V2 / EVEREST save {'model', 'optimizer', 'epoch', 'scaler', 'args': Namespace}."""
    sd = {"_orig_mod.blocks.0.norm1.weight": torch.ones(4)}
    args = argparse.Namespace(model="vit_base_patch16_224", lr=np.float64(1e-3), input_size=224)
    torch.save({"model": sd, "epoch": 799, "args": args, "scaler": {"scale": 65536.0}}, tmp_path / "v2.pth")
    loaded, _ = read_weights(str(tmp_path / "v2.pth"))
    assert torch.equal(loaded["_orig_mod.blocks.0.norm1.weight"], torch.ones(4))


def test_numpy_rng_state_round_trips_for_resume(tmp_path):
    state = {"numpy": np.random.get_state(), "python": __import__("random").getstate()}
    torch.save(state, tmp_path / "rank_00000.pt")
    back = torch_load(tmp_path / "rank_00000.pt")
    assert np.array_equal(back["numpy"][1], state["numpy"][1]) and back["python"] == state["python"]


def test_third_party_loads_are_forced_weights_only_and_restored(crafted):
    path, marker = crafted
    real = torch.load
    with weights_only_loads(), pytest.raises(UnsafeFileError):
        torch.load(path, map_location="cpu", weights_only=False)  # what DeepSpeed's loader asks for
    assert torch.load is real and not marker.exists()


def test_dcp_metadata_with_a_foreign_global_is_refused(tmp_path):
    marker = tmp_path / "code_ran"
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / ".metadata").write_bytes(pickle.dumps(WritesAFile(str(marker))))
    with pytest.raises(UnsafeFileError, match="posix.system|os.system"):
        check_dcp_metadata(tmp_path)
    assert not marker.exists()


@pytest.mark.integration
def test_real_dcp_metadata_passes_the_check(tmp_path):
    """A metadata file written by torch.distributed.checkpoint itself (one process, no group)."""
    code = (
        "import torch, torch.distributed.checkpoint as dcp, sys;"
        "dcp.save({'model': {'w': torch.ones(3)}}, checkpoint_id=sys.argv[1], no_dist=True)"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "model")], check=True, capture_output=True)
    assert (tmp_path / "model" / ".metadata").is_file()
    check_dcp_metadata(tmp_path)


def test_deepspeed_classes_are_imported_only_for_a_file_that_holds_them(tmp_path):
    # A plain checkpoint is read without importing DeepSpeed (seconds, and a CPU warning); a DeepSpeed
    # optimizer shard's loss scaler still loads in a process that has not imported DeepSpeed.
    plain, shard = tmp_path / "plain.pt", tmp_path / "shard.pt"
    torch.save({"model": {"w": torch.ones(2)}}, plain)
    save = (
        "import torch; from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler; "
        "s = DynamicLossScaler(2.0**16, 1000, 1.0, 2, False); "
        f"torch.save({{'scaler': s, 'x': torch.ones(1)}}, {str(shard)!r})"
    )
    subprocess.run([sys.executable, "-c", save], check=True, capture_output=True, timeout=300)
    read = (
        "import sys; from mats_scale.safe_load import torch_load\n"
        f"w = torch_load({str(plain)!r})['model']['w'].tolist()\n"
        "before = 'deepspeed' in sys.modules\n"
        f"s = torch_load({str(shard)!r})['scaler']\n"
        "print(w, before, type(s).__name__, s.cur_scale)\n"
    )
    proc = subprocess.run([sys.executable, "-c", read], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # (DeepSpeed's import prints its accelerator warning to stdout: the answer is the last line)
    assert proc.stdout.splitlines()[-1].split() == ["[1.0,", "1.0]", "False", "DynamicLossScaler", "65536.0"]
