"""The tensor-streaming merge engine: a model merged a block at a time, never held whole.

For each tensor name, in the order its bytes lie on disk, the engine reads that tensor (or a
block of it) from every ingredient onto the chosen device, applies the method's per-tensor
function (which sums in float64) (:mod:`soup_core.merge.methods`) and hands the result, in the
tensor's own dtype, to a writer — then lets it go. Memory is a few blocks: about
``block_bytes``, plus a few MB per input whose bytes await its sha256, whatever the model's size or
its largest tensor (methods that need whole
tensors, such as TIES, hold one tensor per ingredient). Integer tensors (``num_batches_tracked``,
``position_ids``) are copied from the reference ingredient, never averaged, and only when every
ingredient holds the same (counters and single integers excepted: :func:`soup_core.state.is_counter`;
a quantized weight that differs is an error); tied tensors stay tied (each group is merged once and
its aliases are recorded, as in :mod:`soup_core.params`).

Inputs are checked against each other before any math (same names, shapes and dtypes; the error
names the tensor and both files). A NaN or Inf in any input reaches the merged block, so each
merged block is checked, and a non-finite one names the input it came from.

>>> import torch
>>> from soup_core.merge import MappingSource, mean_of, merge_in_memory
>>> a, b = MappingSource({"w": torch.zeros(2)}, name="a"), MappingSource({"w": torch.ones(2)}, name="b")
>>> merge_in_memory(mean_of(), [a, b])["w"].tolist()
[0.5, 0.5]
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from soup_core.errors import CheckpointError, RecipeError
from soup_core.io.layout import TensorInfo
from soup_core.io.weights_out import HF_SHARD_BYTES, StreamingWriter, weights_metadata
from soup_core.merge.methods import ACCUMULATE_DTYPE, TensorMethod
from soup_core.merge.sources import Source
from soup_core.state import Progress, StateDict, integer_differs_message, is_counter, names_list

BLOCK_BYTES = 16 << 20  # float64 working set per block, all ingredients together (cache-sized: bench_merge)


@dataclass
class MergeRun:
    """One merge: its inputs, and what it learnt on the way (per-tensor summaries, e.g. Model
    Stock's ratios) once :meth:`blocks` has been consumed."""

    method: TensorMethod
    sources: Sequence[Source]
    base: Source | None = None
    reference: int = 0  # the ingredient whose integer tensors are copied
    device: torch.device | str | None = None
    block_bytes: int = BLOCK_BYTES
    summaries: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.sources:
            raise RecipeError("a merge needs at least one ingredient")
        if self.method.needs_base and self.base is None:
            raise RecipeError(f"{self.method.name} needs a base checkpoint θ0 (`base = ...` in zoo.toml)")
        check_compatible([*self.sources, *([self.base] if self.base is not None else [])])
        self.device = torch.device(self.device or "cpu")

    @cached_property
    def aliases(self) -> dict[str, str]:
        return self.sources[self.reference].aliases

    @cached_property
    def infos(self) -> dict[str, TensorInfo]:
        """The output's tensors (each tied group once), in the first ingredient's order on disk."""
        reference = self.sources[self.reference].infos
        return {key: reference[key] for key in self.sources[0].layout_order() if key not in self.aliases}

    def _read_all(self, key: str, start: int, stop: int | None) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        blocks = [s.read(key, start, stop).to(self.device) for s in self.sources]
        base = self.base.read(key, start, stop).to(self.device) if self.method.needs_base else None
        return blocks, base

    def _refuse_non_finite(self, key: str, start: int, stop: int | None, merged: torch.Tensor) -> None:
        """Name the input whose NaN/Inf made a merged block non-finite (read again, on the error path only)."""
        if bool(torch.isfinite(merged).all()):
            return  # finite values whose float64 sum overflowed (beyond 1e308: float64 inputs only)
        for source in (*self.sources, *([self.base] if self.method.needs_base else [])):
            if not bool(torch.isfinite(source.read(key, start, stop)).all()):
                raise CheckpointError(f"{source.name}: tensor {key!r} holds NaN or Inf values; a soup with it would "
                                      "be NaN too — leave this checkpoint out")
        raise CheckpointError(f"{key!r}: the merged values overflow {str(merged.dtype).removeprefix('torch.')} "
                              "(weights this far outside the inputs' range have no finite value in that dtype)")

    def blocks(self, progress: Progress | None = None) -> Iterator[tuple[str, int, torch.Tensor]]:
        """``(name, first element, merged block in the tensor's dtype)`` for every output tensor."""
        infos = self.infos
        total = sum(info.nbytes for info in infos.values()) or 1
        done = 0
        for key, info in infos.items():
            if not (info.dtype.is_floating_point or info.dtype.is_complex):  # a copy: never the caller's tensor
                yield key, 0, self._integer(key, info)
            else:
                yield from self._merge_tensor(key, info)
            done += info.nbytes
            if progress is not None:
                progress(done / total, key)

    def _integer(self, key: str, info: TensorInfo) -> torch.Tensor:
        """The reference's integer tensor, once every ingredient is known to hold the same (counters and
        single integers excepted: :func:`soup_core.state.is_counter`)."""
        reference = self.sources[self.reference]
        copy = reference.read(key).clone()
        if not is_counter(key, copy.numel()):
            for source in self.sources:
                if source is not reference and not torch.equal(source.read(key), copy):
                    raise CheckpointError(integer_differs_message(source.name, key, info.dtype, reference.name))
        return copy

    def _merge_tensor(self, key: str, info: TensorInfo) -> Iterator[tuple[str, int, torch.Tensor]]:
        inputs = len(self.sources) + (1 if self.method.needs_base else 0) + 2
        step = max(1, self.block_bytes // (inputs * ACCUMULATE_DTYPE.itemsize))
        if not self.method.elementwise or step >= info.numel:
            ranges = [(0, None)]
        else:
            ranges = [(start, min(start + step, info.numel)) for start in range(0, info.numel, step)]
        summary = None
        if self.method.statistic is not None:
            total = None
            for start, stop in ranges:
                statistic = self.method.statistic(*self._read_all(key, start, stop))
                total = statistic if total is None else total + statistic
            summary = self.method.summary(total) if self.method.summary is not None else total
            self.summaries[key] = summary
        keyword = {"key": key} if self.method.keyed else {}
        if self.method.layout:
            keyword["layout"] = tuple(self.infos)
        for start, stop in ranges:
            merged = self.method.combine(*self._read_all(key, start, stop), summary, **keyword).to(info.dtype)
            # NaN and Inf inputs reach the output of every method; so does an overflow of the dtype
            if not math.isfinite(float(merged.sum(dtype=ACCUMULATE_DTYPE))):
                self._refuse_non_finite(key, start, stop, merged)
            yield key, start, merged


def check_compatible(sources: Sequence[Source]) -> None:
    """Same tensor names, shapes and dtypes in every input (read from headers, before any math)."""
    first = sources[0]
    for other in sources[1:]:
        missing, extra = sorted(set(first.infos) - set(other.infos)), sorted(set(other.infos) - set(first.infos))
        if missing or extra:
            lacks = f"lacks {names_list(missing)}" if missing else ""
            has = f"has {names_list(extra)} that {first.name} has not" if extra else ""
            raise CheckpointError(f"{other.name} and {first.name} hold different tensors: {other.name} "
                                  f"{' and '.join(p for p in (lacks, has) if p)}; a merge needs the same architecture")
        for key, info in first.infos.items():
            theirs = other.infos[key]
            if theirs != info:
                raise CheckpointError(f"{key!r} is {list(theirs.shape)} {str(theirs.dtype).removeprefix('torch.')} in "
                                      f"{other.name} but {list(info.shape)} {str(info.dtype).removeprefix('torch.')} "
                                      f"in {first.name}; a merge needs the same architecture and dtypes")


def merge_in_memory(method: TensorMethod, sources: Sequence[Source], base: Source | None = None, *,
                    reference: int = 0, device: torch.device | str | None = None,
                    summaries: dict[str, Any] | None = None, block_bytes: int = BLOCK_BYTES) -> StateDict:
    """The merged state dict, assembled in memory (small models, and soups that are scored next)
    from blocks of at most ``block_bytes`` of float64 work (:class:`MergeRun`)."""
    run = MergeRun(method, sources, base, reference, device, block_bytes)
    out: StateDict = {}
    for key, start, block in run.blocks():
        if start == 0 and block.shape == run.infos[key].shape:
            out[key] = block
        else:  # blocks of one tensor: assemble
            if start == 0:
                out[key] = torch.empty(run.infos[key].shape, dtype=block.dtype, device=block.device)
            out[key].view(-1)[start:start + block.numel()] = block.reshape(-1)
    for alias, target in run.aliases.items():
        out[alias] = out[target]
    if summaries is not None:
        summaries.update(run.summaries)
    return out


def write_merge(run: MergeRun, out: str | os.PathLike[str], *, folder: bool = False,
                max_shard_bytes: int = HF_SHARD_BYTES, copy_from: Path | None = None,
                inputs: Sequence[str | os.PathLike[str]] = (),
                provenance: Callable[[Mapping[str, str]], Mapping[str, Any]] | None = None,
                extra_files: Callable[[Mapping[str, str]], Mapping[str, str]] | None = None,
                progress: Progress | None = None) -> tuple[Path, dict[str, str]]:
    """Stream ``run`` into a safetensors file or a Hugging Face folder (``folder=True``, sharded past
    ``max_shard_bytes``), atomically. ``provenance`` and ``extra_files`` (a model card) are made from
    the inputs' sha256 digests (source name -> hex), which the sources compute from the bytes the
    merge reads; the header is laid out with placeholders of the same length and rewritten at the end.
    Returns what was written and those digests.
    """
    everyone = [*run.sources, *([run.base] if run.base is not None else [])]
    aliases = None if folder else run.aliases  # Hugging Face re-ties from the model's config

    def metadata(digests: Mapping[str, str]) -> dict[str, str]:
        return weights_metadata(provenance(digests) if provenance is not None else None, aliases)

    placeholders = {s.name: "0" * 64 for s in everyone}
    with StreamingWriter(out, run.infos, metadata(placeholders), folder=folder, max_shard_bytes=max_shard_bytes,
                         copy_from=copy_from, inputs=inputs) as writer:
        for key, start, block in run.blocks(progress):
            writer.write(key, block, start)
        digests = {**placeholders, **{s.name: d for s in everyone if (d := s.sha256()) is not None}}
        return writer.finish(metadata(digests), extra_files(digests) if extra_files is not None else None), digests


__all__ = ["BLOCK_BYTES", "MergeRun", "check_compatible", "merge_in_memory", "write_merge"]
