"""Will it fit, and how long will it take? A planner for one node of N GPUs, before renting it: per
workload x engine x checkpointing policy, the largest micro-batch per GPU, the per-GPU breakdown, step
time and days at a stated MFU (docs/profiling.md gives the formula; nothing is measured on a GPU).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from mats_scale.config import ConfigError
from mats_scale.profiling.flops import step_flops
from mats_scale.profiling.memory import GIB, ActivationModel, Allowance, activation_model, peak_allocated
from mats_scale.profiling.states import ModelStates, model_states, param_stats
from mats_scale.profiling.workload import Profiled, build_model


@dataclass(frozen=True)
class Node:
    gpus: int
    mem_gib: float  # memory per GPU
    peak_tflops: float  # dense bf16 tensor-core peak per GPU
    name: str = "custom"


# Dense (no sparsity) bf16 tensor-core peak and memory per GPU, from NVIDIA's datasheets: A100 SXM
# (312 TFLOPS; 40 / 80 GB), H100 SXM (989; 80 GB), H200 SXM (989; 141 GB HBM3e), B200 (HGX / DGX B200:
# 4.5 PFLOPS FP16/BF16 with 2:4 sparsity, so 2250 dense; 192 GB HBM3e at launch, 180 GB usable per GPU
# in the DGX B200 datasheet: pass --gpu-mem-gib 180 for that). The planner takes datasheet GB as GiB
# (HBM sizes are binary: an "80GB" A100 reports 80 GiB); --gpu-mem-gib sets what nvidia-smi shows.
NODES: dict[str, Node] = {
    "a100-80": Node(8, 80.0, 312.0, "8x A100-80GB"),
    "a100-40": Node(8, 40.0, 312.0, "8x A100-40GB"),
    "h100-80": Node(8, 80.0, 989.0, "8x H100-SXM-80GB"),
    "h200-141": Node(8, 141.0, 989.0, "8x H200-SXM-141GB"),
    "b200-192": Node(8, 192.0, 2250.0, "8x B200-192GB"),
}

# Engines: label -> (engine, zero stage, optimizer offload)
ENGINE_CHOICES: dict[str, tuple[str, int, bool]] = {
    "zero0": ("deepspeed", 0, False),
    "zero1": ("deepspeed", 1, False),
    "zero2": ("deepspeed", 2, False),
    "zero3": ("deepspeed", 3, False),
    "zero3-offload": ("deepspeed", 3, True),
    "fsdp2": ("fsdp2", 3, False),
}

# K400 training videos: about 240k, the size the VideoMAE papers quote (the Kinetics paper: 400 classes
# of at least 400 clips each). Override for the copy you actually have. An epoch visits every video
# once and each visit yields data.num_sample clips, as the trainer and VideoMAE V2 count.
K400_TRAIN_VIDEOS = 240_000


DEFAULT_ALLOWANCE = Allowance()  # frozen: safe as a shared default


def shipped_ds_config(stage: int, offload: bool) -> dict:
    """The project's own DeepSpeed template for a ZeRO stage (what `launchers/pretrain.py` runs)."""
    from mats_scale.parallel.ds_config import load_template
    from mats_scale.resources import ds_template

    return load_template(ds_template("zero3_offload.json" if offload else f"zero{stage}.json"))


def engine_states(stats, label: str, node: Node, dtype, ds_config: dict | None = None) -> ModelStates:
    """Model states per GPU of an ENGINE_CHOICES label on `node` (data parallel over its GPUs).

    Bucket sizes come from `ds_config`, or, when it is None, from the shipped template of the stage
    (ds_configs/zero{stage}.json), since that is what a run without parallel.ds_config uses.
    """
    if label not in ENGINE_CHOICES:
        raise ValueError(f"engine {label!r}: allowed: {', '.join(ENGINE_CHOICES)}")
    engine, stage, offload = ENGINE_CHOICES[label]
    if ds_config is None and engine == "deepspeed":
        ds_config = shipped_ds_config(stage, offload)
    return model_states(
        stats,
        engine=engine,
        zero_stage=stage,
        dp=node.gpus,
        dtype=dtype,
        offload_optimizer=offload,
        ds_config=ds_config,
    )


def max_micro_batch(states: ModelStates, act: ActivationModel, node: Node, allowance: Allowance) -> int:
    """Largest b with peak_allocated(b) (1 + frag) + context <= memory; 0 if none fits."""
    usable = (node.mem_gib - allowance.cuda_context_gib) * GIB / (1.0 + allowance.fragmentation)
    if states.step + act.inputs(1) > usable:
        return 0
    budget = usable - states.total - act.peak_const
    b = max(0, math.floor(budget / (act.peak_per_clip + act.input_per_clip)))
    while b > 0 and peak_allocated(states, act, b) > usable:  # the step transient can bind at small b
        b -= 1
    return b


def step_seconds(train_flops_per_clip: int, batch: int, node: Node, mfu: float) -> float:
    return train_flops_per_clip * batch / (node.peak_tflops * 1e12 * mfu)


def run_steps(
    epochs: float, videos: int, gpus: int, batch: int, num_sample: int = 1, grad_accum: int = 1
) -> int:
    """Optimizer steps of `epochs` visits of every one of `videos` videos at micro-batch `batch` (clips per
    GPU, `num_sample` per video), counted as the trainer counts
    (:func:`mats_scale.train.schedule.steps_per_epoch`, rounded as ``train.epochs`` is); 0 when an
    epoch holds no full optimizer step (the trainer refuses such a schedule)."""
    from mats_scale.train.schedule import steps_per_epoch

    if batch < num_sample:
        return 0
    per_epoch = steps_per_epoch(videos, gpus, batch, num_sample, grad_accum)
    return max(1, round(epochs * per_epoch)) if per_epoch >= 1 else 0


@dataclass(frozen=True)
class Schedule:
    """A configured run's length as the trainer derives it (mats_scale/train/schedule.py)."""

    steps: int
    warmup_steps: int
    steps_per_epoch: int  # 0: no full optimizer step per epoch
    epochs: float  # steps / steps_per_epoch (NaN when an epoch has no step)
    from_epochs: bool  # train.epochs set (steps derived) rather than train.steps


def config_schedule(cfg, world_size: int, videos: int) -> Schedule:
    """train.steps and optim.warmup_steps of `cfg` on `world_size` processes over `videos` training
    videos, the numbers the trainer's ``resolve_epochs`` derives at start (it counts the list file;
    here `videos` is given)."""
    from mats_scale.train.schedule import steps_per_epoch

    t, o, d = cfg.train, cfg.optim, cfg.data
    per_epoch = steps_per_epoch(videos, world_size, d.batch_size, d.num_sample, o.grad_accum)
    if (t.epochs is not None or o.warmup_epochs is not None) and per_epoch < 1:
        raise ConfigError(
            f"train.epochs: {videos} videos over {world_size} processes give no full optimizer step "
            f"per epoch (data.batch_size={d.batch_size}, optim.grad_accum={o.grad_accum})"
        )
    steps = t.steps if t.epochs is None else max(1, round(t.epochs * per_epoch))
    warmup = o.warmup_steps if o.warmup_epochs is None else round(o.warmup_epochs * per_epoch)
    epochs = steps / per_epoch if per_epoch >= 1 else math.nan
    return Schedule(steps, warmup, per_epoch, epochs, t.epochs is not None)


def training_days(
    train_flops_per_clip: int, batch: int, node: Node, mfu: float, steps: int, grad_accum: int = 1
) -> float:
    """Days of `steps` optimizer steps of `grad_accum` micro-batches of `batch` clips per GPU."""
    return steps * grad_accum * step_seconds(train_flops_per_clip, batch, node, mfu) / 86400


@dataclass
class Plan:
    strategy: str
    engine: str
    checkpoint: str
    max_batch: int
    states: ModelStates
    act: ActivationModel
    train_flops_per_clip: int
    step_s: float  # one optimizer step: grad_accum micro-batches of max_batch
    steps: int  # optimizer steps of the planned epochs at max_batch (0 when nothing fits)
    days: float
    allowance_bytes: int

    def row(self) -> dict:
        b = self.max_batch
        act_peak = self.act.peak(b) if b else 0
        inputs = self.act.inputs(b)
        allocated = peak_allocated(self.states, self.act, b) if b else self.states.total
        return {
            "strategy": self.strategy,
            "engine": self.engine,
            "checkpoint": self.checkpoint,
            "max_batch": b,
            "params_gib": self.states.params / GIB,
            "grads_gib": self.states.grads / GIB,
            "master_adam_gib": (self.states.master + self.states.optimizer) / GIB,
            "step_temp_gib": self.states.step_temp / GIB,
            "gathered_gib": self.states.gathered / GIB,
            "buffers_gib": self.states.comm_buffers / GIB,
            "activations_gib": act_peak / GIB,
            "inputs_gib": inputs / GIB,
            "allowance_gib": self.allowance_bytes / GIB,
            "total_gib": (allocated + self.allowance_bytes) / GIB,
            "host_gib": self.states.cpu_bytes / GIB,
            "act_per_clip_mib": self.act.peak_per_clip / 2**20,
            "train_tflops_per_clip": self.train_flops_per_clip / 1e12,
            "step_s": self.step_s,
            "steps": self.steps,
            "days": self.days,
        }


def plan_point(
    strategy: str,
    engine: str,
    checkpoint: str,
    states: ModelStates,
    act: ActivationModel,
    train_flops_per_clip: int,
    node: Node,
    *,
    mfu: float,
    epochs: float,
    videos: int,
    num_sample: int = 1,
    grad_accum: int = 1,
    allowance: Allowance = DEFAULT_ALLOWANCE,
) -> Plan:
    """One point of the plan: the largest micro-batch of these states and activations on `node`, its
    step time, and the steps and days of `epochs` visits of `videos` videos (each visit
    `num_sample` clips) at that micro-batch (NaN days when nothing fits)."""
    b = max_micro_batch(states, act, node, allowance)
    allocated = peak_allocated(states, act, b) if b else states.total
    tf = train_flops_per_clip
    steps = run_steps(epochs, videos, node.gpus, b, num_sample, grad_accum) if b else 0
    return Plan(
        strategy,
        engine,
        checkpoint,
        b,
        states,
        act,
        tf,
        grad_accum * step_seconds(tf, b, node, mfu) if b else math.nan,
        steps,
        training_days(tf, b, node, mfu, steps, grad_accum) if steps else math.nan,
        allowance.total(allocated),
    )


def plan(
    wl_by_strategy: dict[str, Profiled],
    engines: list[str],
    policies: dict[str, tuple[int, int]],
    node: Node,
    *,
    mfu: float = 0.35,
    epochs: float = 800,
    videos: int = K400_TRAIN_VIDEOS,
    num_sample: int = 1,
    grad_accum: int = 1,
    allowance: Allowance = DEFAULT_ALLOWANCE,
    ds_config: dict | None = None,
    progress=None,
) -> list[Plan]:
    """Every strategy x engine x policy. `wl_by_strategy` gives the workload (pre-training or
    fine-tuning: one model, its inputs and dtype) per strategy; days are for `epochs` visits of every
    one of `videos` videos, `num_sample` clips per visit (the trainer's epoch)."""
    plans = []
    any_wl = next(iter(wl_by_strategy.values()))
    stats = param_stats(build_model(any_wl, "meta"))
    states = {}
    for label in engines:
        states[label] = engine_states(stats, label, node, any_wl.dtype, ds_config)
    for strategy, wl in wl_by_strategy.items():
        for pname, policy in policies.items():
            wlp = replace(wl, batch=1, checkpoint=policy)
            act = activation_model(wlp)
            tf = step_flops(wlp)
            for label in engines:
                plans.append(
                    plan_point(
                        strategy,
                        label,
                        pname,
                        states[label],
                        act,
                        tf,
                        node,
                        mfu=mfu,
                        epochs=epochs,
                        videos=videos,
                        num_sample=num_sample,
                        grad_accum=grad_accum,
                        allowance=allowance,
                    )
                )
            if progress is not None:
                progress.update(1)
    return plans


def gpu_clips_per_s(train_flops_per_clip: float, node: Node, mfu: float) -> float:
    """Clips per second one GPU consumes: its dense peak x MFU / training FLOPs per clip."""
    return node.peak_tflops * 1e12 * mfu / train_flops_per_clip


@dataclass(frozen=True)
class DataVerdict:
    """Can the host's CPU cores decode and augment as many clips as the GPUs consume?

    One loader worker is one core; every GPU's training process keeps one core for itself
    (``reserved_per_gpu``), the rest can run workers."""

    gpu_clips_per_s: float  # consumed by one GPU
    node_clips_per_s: float  # consumed by all GPUs of the node
    core_clips_per_s: float  # delivered by one core (profiling/bench_data.py --list FILE)
    cores_needed: int  # ceil(node_clips_per_s / core_clips_per_s)
    cores_for_workers: int  # host cores minus the training processes'
    gpus: int

    @property
    def decode_bound(self) -> bool:
        return self.cores_needed > self.cores_for_workers

    @property
    def workers_per_gpu(self) -> int:
        return math.ceil(self.cores_needed / self.gpus)

    @property
    def gpu_busy_fraction(self) -> float:
        """Share of the compute-bound speed the GPUs reach (1 unless decode-bound)."""
        return min(1.0, self.cores_for_workers * self.core_clips_per_s / self.node_clips_per_s)

    def text(self) -> str:
        need = (
            f"{self.gpus} GPUs x {self.gpu_clips_per_s:.0f} clips/s = {self.node_clips_per_s:.0f} "
            f"clips/s at {self.core_clips_per_s:.1f} clips/s per core"
        )
        if self.decode_bound:
            return (
                f"decode-bound: needs {self.cores_needed} cores / workers ({self.workers_per_gpu} per "
                f"GPU) for {need}; {self.cores_for_workers} are free for workers, so the GPUs run at "
                f"most {self.gpu_busy_fraction:.0%} busy"
            )
        plural = "s" if self.workers_per_gpu != 1 else ""
        return (
            f"compute-bound: {self.cores_needed} of {self.cores_for_workers} free cores "
            f"({self.workers_per_gpu} worker{plural} per GPU) deliver {need}"
        )


def data_verdict(
    train_flops_per_clip: float,
    node: Node,
    mfu: float,
    core_clips_per_s: float,
    host_cores: int,
    reserved_per_gpu: int = 1,
) -> DataVerdict:
    """The data side of a plan: GPU consumption against what the host's cores deliver."""
    if core_clips_per_s <= 0 or host_cores < 1:
        raise ValueError("core_clips_per_s must be > 0 and host_cores >= 1")
    per_gpu = gpu_clips_per_s(train_flops_per_clip, node, mfu)
    total = per_gpu * node.gpus
    return DataVerdict(
        per_gpu,
        total,
        core_clips_per_s,
        math.ceil(total / core_clips_per_s),
        max(0, host_cores - reserved_per_gpu * node.gpus),
        node.gpus,
    )


def engine_of(parallel) -> str:
    """The ENGINE_CHOICES label of a ``parallel`` config section (from the engine registry)."""
    from mats_scale.parallel.engine import states_label

    return states_label(parallel)


def check_config(
    wl: Profiled,
    engine: str,
    node: Node,
    *,
    allowance: Allowance = DEFAULT_ALLOWANCE,
    ds_config: dict | None = None,
) -> dict:
    """Predicted per-GPU memory of one configured job (its micro-batch `wl.batch`) and the largest
    micro-batch that fits, as one row."""
    states = engine_states(param_stats(build_model(wl, "meta")), engine, node, wl.dtype, ds_config)
    act = activation_model(wl)
    allocated = peak_allocated(states, act, wl.batch)
    total = allocated + allowance.total(allocated)
    return {
        "engine": engine,
        "batch": wl.batch,
        "states_gib": states.total / GIB,
        "activations_gib": act.peak(wl.batch) / GIB,
        "allocated_gib": allocated / GIB,
        "total_gib": total / GIB,
        "capacity_gib": node.mem_gib,
        "fits": total <= node.mem_gib * GIB,
        "max_batch": max_micro_batch(states, act, node, allowance),
    }
