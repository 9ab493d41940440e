"""The Task seam: a second task (a toy classifier, tests/toy_task.py) trains through the same Trainer
and engines as pre-training, on 2 processes under ZeRO-3 and FSDP2, and resumes exactly."""

from __future__ import annotations

import pytest
import torch
from launch_util import ROOT, metric_runs, tail, torchrun
from task_worker import ENGINES, STEPS, STOP_AT
from toy_task import ToyClassifierTask

from mats_scale.config import load_config
from mats_scale.train.task import Task

pytestmark = pytest.mark.dist


@pytest.fixture(scope="module")
def toy_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy")
    proc = torchrun(2, [ROOT / "tests" / "task_worker.py", out])
    assert proc.returncode == 0, tail(proc)
    return out, torch.load(out / "results.pt", weights_only=False)


def test_toy_task_satisfies_the_task_protocol():
    assert isinstance(ToyClassifierTask(load_config(None, [])), Task)


@pytest.mark.parametrize("engine", list(ENGINES))
def test_second_task_trains_through_the_generic_trainer(toy_runs, engine):
    out, results = toy_runs
    ref = results[engine]["reference"]
    assert ref["step"] == STEPS and ref["engine"] == {"zero3": "deepspeed-zero3", "fsdp2": "fsdp2"}[engine]
    steps = metric_runs(out / engine / "reference")[0]["steps"]
    assert sorted(steps) == list(range(1, STEPS + 1))
    # The task's own metric is all-reduced and logged; the classifier learns the separable toy classes.
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in steps.values())
    assert steps[STEPS]["loss"] < steps[1]["loss"]
    assert steps[STEPS]["accuracy"] > 0.25  # chance for 4 classes


@pytest.mark.parametrize("engine", list(ENGINES))
def test_second_task_resumes_exactly(toy_runs, engine):
    out, results = toy_runs
    rec = results[engine]
    assert rec["stopped"]["stopped"] and rec["stopped"]["step"] == STOP_AT
    assert rec["resumed"]["resumed_from"].endswith(f"step_{STOP_AT:08d}") and rec["resumed"]["step"] == STEPS
    ref_steps = metric_runs(out / engine / "reference")[0]["steps"]
    runs = metric_runs(out / engine / "resumed")
    assert runs[1]["start"]["resumed_from"] is not None
    for step in range(STOP_AT + 1, STEPS + 1):
        assert runs[1]["steps"][step]["loss"] == ref_steps[step]["loss"]
        assert runs[1]["steps"][step]["accuracy"] == ref_steps[step]["accuracy"]
    for key, value in rec["reference"]["weights"].items():
        assert torch.equal(rec["resumed"]["weights"][key], value), key
