"""What a run directory records and guards: the resume config check, resume records, metrics after a
resume, epoch schedules, provenance, the run-dir lock, Slurm's variables, the DeepSpeed build notice."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from launch_util import PRETRAIN, ROOT, TINY, env, free_port, metric_runs, tail

from mats_scale.config import ConfigError, load_config
from mats_scale.parallel.ds_ops import first_build_notice
from mats_scale.parallel.slurm import apply_slurm_env, expand_nodelist
from mats_scale.run.checkpoint import CheckpointError
from mats_scale.run.lock import RunDirInUse
from mats_scale.train.loop import train
from mats_scale.train.schedule import steps_per_epoch

LOCAL = TINY + ["parallel.backend=none", "data.batch_size=2", "logging.log_every=1"]


def _cfg(out: Path, *overrides: str):
    return load_config(None, LOCAL + [f"train.out_dir={out}", *overrides])


def _run_files(out: Path) -> dict[str, str]:
    return {name: (out / name).read_text() for name in ("config.yaml", "provenance.json")}


# ---- resume with another config ------------------------------------------------------------------
def test_resume_with_a_changed_config_is_refused_naming_the_keys_and_writes_nothing(tmp_path, monkeypatch):
    train(_cfg(tmp_path, "train.steps=2"))
    before = _run_files(tmp_path)
    from mats_scale.train import loop

    def no_group(*args):
        raise AssertionError("refused only after joining the process group")

    monkeypatch.setattr(loop, "init_distributed", no_group)  # refused first: no group, no op build, no model
    with pytest.raises(ConfigError) as err:
        train(_cfg(tmp_path, "train.steps=2", "masking.strategy=random", "optim.base_lr=0.01"))
    msg = str(err.value)
    assert "masking.strategy='random' (the run has 'tube')" in msg and "optim.base_lr=0.01" in msg
    assert "train.allow_changes=[masking.strategy,optim.base_lr]" in msg and "\n" not in msg
    assert _run_files(tmp_path) == before and not (tmp_path / "resumes.jsonl").exists()
    monkeypatch.undo()
    # Keys that cannot change the numbers (logging, loader workers) need no allowance.
    again = train(_cfg(tmp_path, "train.steps=2", "logging.log_every=5", "data.prefetch_factor=3"))
    assert again.step == 2 and _run_files(tmp_path) == before
    (record,) = [json.loads(x) for x in (tmp_path / "resumes.jsonl").read_text().splitlines()]
    assert record["step"] == 2 and record["changes"] == {} and record["checkpoint"].endswith("step_00000002")


def test_a_resume_refused_by_the_checkpoint_leaves_the_run_files_alone(tmp_path):
    train(_cfg(tmp_path, "train.steps=2"))
    before = _run_files(tmp_path)
    # Allowed by the config check, refused by the checkpoint (another model): nothing is rewritten.
    with pytest.raises(CheckpointError, match="written with model="):
        train(_cfg(tmp_path, "train.steps=2", "model.drop_path=0.1", "train.allow_changes=[model]"))
    assert _run_files(tmp_path) == before and not (tmp_path / "resumes.jsonl").exists()


def test_the_lr_named_for_a_train_steps_change_is_one_that_changes(tmp_path):
    """Inside the warm-up both schedules agree: the message names the first step whose lr differs."""
    train(_cfg(tmp_path, "train.steps=20", "train.save_every=10", "optim.warmup_steps=15"))
    shutil.rmtree(tmp_path / "checkpoints" / "step_00000020")
    with pytest.raises(ConfigError, match=r"lr of step (\d+) would go from (\S+) to (\S+)") as e:
        train(_cfg(tmp_path, "train.steps=40", "optim.warmup_steps=15"))
    import re

    step, a, b = re.search(r"lr of step (\d+) would go from (\S+) to (\S+)", str(e.value)).groups()
    assert int(step) > 15 and a != b


def test_a_finetune_into_a_pretraining_run_directory_says_so(tmp_path):
    from mats_scale.train.finetune import FinetuneTask

    train(_cfg(tmp_path, "train.steps=1"))
    cfg = _cfg(tmp_path, "train.steps=1", "data.dataset=synthetic", "finetune.num_classes=4")
    with pytest.raises(ConfigError, match=r"holds a pretrain run \(step_00000001\); a finetune run needs"):
        train(cfg, FinetuneTask(cfg))


@pytest.mark.integration
def test_changing_train_steps_is_refused_or_allowed_explicitly_with_the_lr_jump_logged(tmp_path):
    train(
        _cfg(tmp_path, "train.steps=20", "train.save_every=10", "optim.warmup_steps=2", "train.keep_last=3")
    )
    shutil.rmtree(tmp_path / "checkpoints" / "step_00000020")  # continue from step 10 (the newest left)
    with pytest.raises(ConfigError, match=r"train.steps=40 \(the run has 20\).*lr of step 11 would go from "):
        train(_cfg(tmp_path, "train.steps=40", "optim.warmup_steps=2"))
    result = train(
        _cfg(tmp_path, "train.steps=40", "optim.warmup_steps=2", "train.allow_changes=[train.steps]")
    )
    assert result.step == 40
    log = (tmp_path / "train.log").read_text()
    assert (
        "train.steps 20 -> 40 (allowed by train.allow_changes): the cosine lr schedule is recomputed" in log
    )
    (record,) = [json.loads(x) for x in (tmp_path / "resumes.jsonl").read_text().splitlines()]
    assert record["changes"] == {"train.steps": {"checkpoint": 20, "now": 40}} and record["step"] == 10
    assert "steps: 20" in (tmp_path / "config.yaml").read_text()  # the record of the first session stays


def test_unknown_allowance_key_is_named(tmp_path):
    train(_cfg(tmp_path, "train.steps=1"))
    with pytest.raises(
        ConfigError,
        match=r"train.allow_changes: optim.baselr: unknown key; did you mean "
        r"optim.base_lr\?",
    ):
        train(_cfg(tmp_path, "train.steps=1", "train.allow_changes=[optim.baselr]"))


def test_metrics_after_a_resume_have_one_record_per_step(tmp_path):
    train(_cfg(tmp_path, "train.steps=4", "train.save_every=2", "train.keep_last=2"))
    # As after a crash between saves: steps 3-4 were logged, the newest checkpoint is step 2.
    shutil.rmtree(tmp_path / "checkpoints" / "step_00000004")
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 0.9')  # and a line cut short by the crash
    train(_cfg(tmp_path, "train.steps=4", "train.save_every=2", "train.keep_last=2"))
    runs = metric_runs(tmp_path)
    assert [sorted(r["steps"]) for r in runs] == [[1, 2], [3, 4]]
    # each session closes with the peak after its last optimizer step (first session: cut, no end)
    assert runs[0]["end"] is None or runs[0]["end"]["at_step"] == 4
    end = runs[1]["end"]
    assert end["at_step"] == 4 and end["peak_mem_sum_gib"] >= runs[1]["steps"][4]["peak_mem_sum_gib"]
    start = runs[1]["start"]
    assert start["resumed_from"].endswith("step_00000002") and start["dropped_steps"] == 3
    steps = [
        json.loads(x)["step"]
        for x in (tmp_path / "metrics.jsonl").read_text().splitlines()
        if "event" not in json.loads(x)
    ]
    assert steps == [1, 2, 3, 4]


# ---- epoch schedules ------------------------------------------------------------------------------
def test_steps_per_epoch_follow_the_loader():
    assert steps_per_epoch(240_000, 8, 64, 2, 1) == 30_000 // 32
    assert steps_per_epoch(1024, 2, 4, 1, 2) == 64
    assert steps_per_epoch(10, 4, 4, 1, 1) == 0


def test_epochs_and_warmup_epochs_derive_the_steps(tmp_path):
    # 1024 synthetic clips, 2 per step: 512 steps per epoch; 0.01 epochs -> 5 steps, warm-up 0.004 -> 2.
    result = train(_cfg(tmp_path, "train.epochs=0.01", "optim.warmup_epochs=0.004", "optim.min_lr=0"))
    assert result.step == 5
    saved = load_config(str(tmp_path / "config.yaml"))
    assert (saved.train.steps, saved.optim.warmup_steps, saved.train.epochs) == (5, 2, 0.01)
    assert (
        "train.epochs=0.01 -> train.steps=5; optim.warmup_epochs=0.004 -> optim.warmup_steps=2"
        in (tmp_path / "train.log").read_text()
    )
    lrs = [r["lr"] for r in metric_runs(tmp_path)[0]["steps"].values()]
    assert lrs[0] < lrs[1] == lrs[2] > lrs[3] > lrs[4]  # 2 warm-up steps, then the cosine over 3


# ---- provenance and the run-dir lock ---------------------------------------------------------------
def test_provenance_names_code_command_libraries_and_machine(tmp_path):
    train(_cfg(tmp_path, "train.steps=1"))
    prov = json.loads((tmp_path / "provenance.json").read_text())
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:
        assert prov["git"]["commit"] == head.stdout.strip() and isinstance(prov["git"]["dirty"], bool)
    import torch

    assert prov["versions"]["torch"] and prov["versions"]["torch"].split("+")[0] in torch.__version__
    assert {"deepspeed", "timm", "decord", "cuda", "nccl"} <= set(prov["versions"])
    from importlib import metadata

    assert prov["versions"]["mats_scale"] == metadata.version("mats_scale")  # also without a git checkout
    assert prov["host"] == socket.gethostname() and prov["device"] and prov["argv"] == sys.argv


def test_a_second_job_cannot_write_a_run_dir_in_use(tmp_path):
    tmp_path.mkdir(exist_ok=True)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import fcntl, os, socket, sys, time\n"
                f"f = open({str(tmp_path / '.lock')!r}, 'a+'); fcntl.flock(f, fcntl.LOCK_EX)\n"
                "f.write(f'pid {os.getpid()} host {socket.gethostname()}\\n'); f.flush()\n"
                "print('locked', flush=True)\n"
                "time.sleep(60)\n"
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirInUse, match=f"in use by another job \\(pid {holder.pid} host "):
            train(_cfg(tmp_path, "train.steps=1"))
        assert not (tmp_path / "config.yaml").exists()
    finally:
        holder.kill()
        holder.wait()
    assert train(_cfg(tmp_path, "train.steps=1")).step == 1  # the lock died with its owner


# ---- Slurm -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "nodelist,hosts",
    [
        ("node01", ["node01"]),
        ("node[01-04]", ["node01", "node02", "node03", "node04"]),
        ("gpu[8-10,12],login1", ["gpu8", "gpu9", "gpu10", "gpu12", "login1"]),
        ("rack[1-2]-n[01-02]", ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02"]),
    ],
)
def test_slurm_nodelists_expand(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


def test_slurm_variables_give_rank_world_and_master_only_without_a_launcher():
    environ = {
        "SLURM_PROCID": "5",
        "SLURM_NTASKS": "16",
        "SLURM_LOCALID": "5",
        "SLURM_JOB_NODELIST": "node[07-08]",
        "SLURM_JOB_ID": "123456",
    }
    assert apply_slurm_env(environ)
    assert {k: environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")} == {
        "RANK": "5",
        "WORLD_SIZE": "16",
        "LOCAL_RANK": "5",
        "MASTER_ADDR": "node07",
        "MASTER_PORT": "18456",
    }
    launched = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "RANK": "3", "WORLD_SIZE": "8"}
    assert not apply_slurm_env(launched) and launched["RANK"] == "3"  # torchrun / deepspeed inside Slurm


@pytest.mark.integration
@pytest.mark.dist
def test_srun_style_tasks_form_one_job(tmp_path):
    # What `srun -n 2 python launchers/pretrain.py` gives each task: Slurm's variables, no torch ones.
    run_dir = tmp_path / "run"

    def task_env(rank: int) -> dict[str, str]:
        e = env(
            SLURM_PROCID=str(rank),
            SLURM_NTASKS="2",
            SLURM_LOCALID=str(rank),
            SLURM_JOB_NODELIST="localhost",
            SLURM_JOB_ID="4242",
        )
        e["MASTER_PORT"] = port  # a free one (the port derived from the job id is tested above)
        return e

    port = str(free_port())
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(PRETRAIN),
                *TINY,
                "parallel.backend=fsdp2",
                "data.batch_size=2",
                "train.steps=2",
                f"train.out_dir={run_dir}",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=tmp_path,
            env=task_env(r),
        )
        for r in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, tail(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    (only,) = metric_runs(run_dir)
    assert only["start"]["world_size"] == 2 and sorted(only["steps"]) == [1, 2]


def test_scripts_ship_sbatch_examples_for_one_and_two_nodes():
    for name, nodes in (("slurm_1node.sbatch", 1), ("slurm_2nodes.sbatch", 2)):
        text = (ROOT / "scripts" / name).read_text()
        assert f"#SBATCH --nodes={nodes}" in text and "srun" in text and "launchers/pretrain.py" in text
        assert subprocess.run(["bash", "-n", str(ROOT / "scripts" / name)]).returncode == 0


# ---- DeepSpeed's first build ----------------------------------------------------------------------
def test_deepspeed_first_build_is_announced_until_the_op_is_cached(tmp_path):
    note = first_build_notice(["deepspeed_shm_comm"], str(tmp_path))
    assert note.startswith("DeepSpeed compiles its deepspeed_shm_comm op now (first launch only")
    # torch's default root (<root>/py311_cpu/<op>/) and TORCH_EXTENSIONS_DIR (<root>/<op>/)
    for root, built in (
        (tmp_path / "a", tmp_path / "a" / "py311_cpu" / "deepspeed_shm_comm"),
        (tmp_path / "b", tmp_path / "b" / "deepspeed_shm_comm"),
    ):
        built.mkdir(parents=True)
        assert first_build_notice(["deepspeed_shm_comm"], str(root)).startswith("DeepSpeed compiles")
        (built / "deepspeed_shm_comm.so").write_bytes(b"")
        assert first_build_notice(["deepspeed_shm_comm"], str(root)) is None
