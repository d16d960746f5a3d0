"""Merges that stream tensor by tensor: read each tensor from every ingredient, combine, write, release.

* :mod:`~soup_core.merge.sources` — checkpoints as sources of tensors (safetensors by byte
  ranges, hashed as they are read; other formats through the safe reader);
* :mod:`~soup_core.merge.methods` — weight-only methods as per-tensor functions;
* :mod:`~soup_core.merge.engine` — runs a method over every tensor, in memory or into
  safetensors files (one, or a Hugging Face folder of shards), atomically.

Weight-only recipes (:mod:`soup_core.recipes`: uniform, weighted, Model Stock) are these methods;
``soup make`` streams them to disk when the zoo has no evaluator to score the soup with.
"""

from soup_core.merge.engine import BLOCK_BYTES, MergeRun, check_compatible, merge_in_memory, write_merge
from soup_core.merge.methods import TensorMethod, linear, mean_of, model_stock, model_stock_ratio_from_gram
from soup_core.merge.sources import MappingSource, SafetensorsSource, Source, open_source

__all__ = ["BLOCK_BYTES", "MappingSource", "MergeRun", "SafetensorsSource", "Source", "TensorMethod",
           "check_compatible", "linear", "mean_of", "merge_in_memory", "model_stock", "model_stock_ratio_from_gram",
           "open_source", "write_merge"]
