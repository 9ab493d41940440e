"""Profilers that answer, before a GPU is rented, whether a pre-training configuration fits and how
fast it runs (profiling/VALIDATION.md says what is exact and what is modelled).

    workload     the micro-batch being profiled: model config, masking preset, batch, dtype, checkpointing
    flops        fvcore MACs per clip (+ an SDPA handle), training-step FLOPs (FlopCounterMode)
    memory       activation bytes measured on ``meta``; model states per DeepSpeed stage / FSDP2
    feasibility  largest micro-batch per GPU, per-GPU breakdown, step time and days on a node
    report, cli  CSV / Markdown / PNG writers and the argument parsing shared by profiling/*.py

Submodules are imported explicitly (``from mats_scale.profiling.memory import ...``) so that a CLI only
pays for what it uses.
"""
