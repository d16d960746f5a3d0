"""How much memory a landscape run may use: a share of what is free, and cache-sized calls on a CPU."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from soup_core.memory import free_memory

# Bytes of activations one batched call may touch on a CPU: tiny calls drown in per-call
# overhead and huge ones leave the cache (`bench/bench_landscape.py --strategy vmap
# --working-set N` measures it; bench/RESULTS.md, "Landscape"). A GPU wants large calls: its
# working set is its whole budget.
CPU_WORKING_SET = 32 << 20
CPU_WEIGHTS_BUDGET = 1 << 30  # bytes of stacked weights per chunk on a CPU
# Of the memory free when a run starts, the share it may allocate (the rest is the caching
# allocator's slack and whatever else runs in the process).
BUDGET_SHARE = {"cuda": 0.75, "cpu": 0.5}


def device_budget(device: torch.device) -> int:
    """Bytes a landscape run may allocate on ``device``: a share of the memory free now
    (:func:`soup_core.memory.free_memory`)."""
    return int(free_memory(device) * BUDGET_SHARE.get(device.type, BUDGET_SHARE["cpu"]))


@dataclass(frozen=True)
class Budget:
    """``total`` bounds what one call allocates (stacked weights + activations); ``working_set`` is
    the activations a batched call aims at (cache-sized on a CPU); ``weights`` the stacked weights
    of one chunk."""

    total: int
    working_set: int
    weights: int

    @classmethod
    def on(cls, device: torch.device, memory_budget: int | None = None, working_set: int | None = None) -> Budget:
        total = memory_budget or device_budget(device)
        on_cpu = device.type == "cpu"
        return cls(total, min(working_set or (CPU_WORKING_SET if on_cpu else total), total),
                   min(CPU_WEIGHTS_BUDGET, total // 2) if on_cpu else total // 2)
