"""Profilers that answer, before a GPU is rented, what a training configuration costs and whether it fits
(commands ``mats-flops``, ``mats-memory``, ``mats-plan``); docs/profiling.md lists the modules, which are
imported one by one so that a command only pays for what it uses."""
