"""The one decode path: rows with their own prefixes in fixed-shape buffers, sampled on the device."""

from . import rules
from .attention import install
from .batch import Batch, generate
from .constraint import TokenConstraint, TokenSequences
from .rows import Prefix, RowsCache, bucket
from .sampling import GREEDY_BELOW, RowSampling, SamplingParams, sampling_params

__all__ = ["Batch", "GREEDY_BELOW", "Prefix", "RowSampling", "RowsCache", "SamplingParams", "TokenConstraint",
           "TokenSequences", "bucket", "generate", "install", "rules", "sampling_params"]
