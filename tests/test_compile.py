"""``train.compile``: torch.compile per transformer block under every engine, with activation
checkpointing: the same losses as the eager run, and no compiling after the first step (torch._dynamo's
frame counter, summed over ranks, logged as ``compiled_frames``)."""

from __future__ import annotations

import pytest
from launch_util import TINY, metric_runs, pretrain, tail

from mats_scale.config import load_config
from mats_scale.models.pretrain import pretrain_spec
from mats_scale.models.spec import build_model
from mats_scale.parallel.checkpointing import apply_checkpoint_policy
from mats_scale.parallel.compile import apply_compile, block_module
from mats_scale.train.compile import RecompileWatch
from mats_scale.train.loop import train

# MATS + running-cell dual masking: the token counts the compiled blocks see are fixed per config.
BASE = TINY + [
    "masking.preset=mats+dual",
    "data.batch_size=2",
    "train.steps=4",
    "train.precision=fp32",
    "logging.log_every=1",
]
# Compiled kernels reorder fp32 reductions: losses agree with the eager run to this relative tolerance.
RTOL = 1e-5


def _model(*overrides: str, compile_: bool, inside_wrapper: bool = False):
    cfg = load_config(None, TINY + ["parallel.checkpoint_encoder_every=1", *overrides])
    spec = pretrain_spec(cfg.model)
    model = apply_checkpoint_policy(build_model(spec, "meta"), spec, cfg.parallel)
    return apply_compile(model, spec, compile_, inside_wrapper=inside_wrapper), spec


def _blocks(model, spec) -> list:
    return [b for group in spec.block_groups(model).values() for b in group]


def _compiled(module) -> bool:
    """Whether the module's own ``forward`` was replaced by a dynamo-compiled function."""
    return hasattr(vars(module).get("forward"), "_torchdynamo_orig_callable")


@pytest.mark.parametrize("inside_wrapper", [False, True])
def test_compile_wraps_each_blocks_forward_and_keeps_the_state_dict_keys(inside_wrapper):
    eager, spec = _model(compile_=False)
    compiled, _ = _model(compile_=True, inside_wrapper=inside_wrapper)
    blocks = _blocks(compiled, spec)
    assert len(blocks) == 3  # debug: 2 encoder blocks (checkpointed) + 1 decoder block
    wrapped = [b for b in blocks if b is not block_module(b)]
    assert len(wrapped) == 2  # the encoder's are inside checkpoint wrappers
    for b in wrapped:  # the checkpoint wrapper's forward (checkpoint inside the graph), or the block's
        assert (_compiled(b), _compiled(block_module(b))) == (not inside_wrapper, inside_wrapper)
    assert _compiled(blocks[2])  # the decoder block: no wrapper
    assert not any(_compiled(m) for b in _blocks(eager, spec) for m in (b, block_module(b)))
    assert compiled.state_dict().keys() == eager.state_dict().keys()  # checkpoints do not care


def test_recompile_watch_warns_once_when_compiling_goes_on_after_the_first_step():
    watch = RecompileWatch()
    assert watch.check(1, 4) is None  # warm-up: whatever the first step compiled
    assert watch.check(2, 4) is None
    note = watch.check(3, 6)
    assert note.startswith("step 3: torch.compile compiled 2 more graph(s) after warm-up")
    assert "TORCH_LOGS=recompiles" in note
    assert watch.check(4, 8) is None  # said once


def _losses(run: dict) -> list[float]:
    return [run["steps"][s]["loss"] for s in sorted(run["steps"])]


def _assert_compiled_like_eager(compiled: dict, eager: dict) -> None:
    assert _losses(compiled) == pytest.approx(_losses(eager), rel=RTOL)
    assert _losses(compiled)[0] != _losses(compiled)[-1]  # the steps did train
    frames = [compiled["steps"][s]["compiled_frames"] for s in sorted(compiled["steps"])]
    assert frames[0] > 0  # the first step compiled ...
    assert frames == [frames[0]] * len(frames)  # ... and no later step compiled again, on any rank


@pytest.mark.integration
def test_one_process_compiled_run_with_checkpointing_matches_the_eager_run(tmp_path):
    runs = {}
    for compile_ in (False, True):
        out = tmp_path / f"compile_{compile_}"
        overrides = ["parallel.backend=none", "parallel.checkpoint_encoder_every=1", f"train.out_dir={out}"]
        train(load_config(None, BASE + overrides + [f"train.compile={str(compile_).lower()}"]))
        (runs[compile_],) = metric_runs(out)
    assert "compiled_frames" not in runs[False]["steps"][1]
    _assert_compiled_like_eager(runs[True], runs[False])
    assert "after warm-up" not in (tmp_path / "compile_True" / "train.log").read_text()  # no warning


# 2 CPU processes (gloo): an eager reference, then compiled runs under each sharding engine.
ENGINES = {
    "zero1": ["parallel.backend=deepspeed", "parallel.zero_stage=1"],
    "zero3_ac": [
        "parallel.backend=deepspeed",
        "parallel.zero_stage=3",
        "parallel.checkpoint_encoder_every=1",
        "parallel.checkpoint_decoder_every=1",
    ],
    "fsdp2_ac": ["parallel.backend=fsdp2", "parallel.checkpoint_encoder_every=1"],
}


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("compile")
    runs = {}
    for name, overrides in {"eager": ["parallel.backend=fsdp2"], **ENGINES}.items():
        flag = "false" if name == "eager" else "true"
        proc = pretrain(2, BASE + overrides + [f"train.compile={flag}", f"train.out_dir={root / name}"], 600)
        assert proc.returncode == 0, tail(proc)
        (runs[name],) = metric_runs(root / name)
    return runs


@pytest.mark.integration
@pytest.mark.parametrize("name", list(ENGINES))
def test_two_process_compiled_engine_matches_the_eager_run_without_recompiles(two_process_runs, name):
    run = two_process_runs[name]
    _assert_compiled_like_eager(run, two_process_runs["eager"])
    assert len(run["steps"][1]["data_wait_ranks"]) == 2  # every rank's data wait reached rank 0
