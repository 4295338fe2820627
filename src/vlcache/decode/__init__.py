"""The one decode path: rows with their own prefixes, K/V in shared blocks, sampled on the device."""

from . import linear, rules
from .attention import install
from .batch import Batch, generate
from .constraint import TokenConstraint, TokenSequences
from .kvpool import KVPool
from .rows import Prefix, RowsCache, bucket
from .sampling import GREEDY_BELOW, RowSampling, SamplingParams, sampling_params

__all__ = ["Batch", "GREEDY_BELOW", "KVPool", "Prefix", "RowSampling", "RowsCache", "SamplingParams", "TokenConstraint",
           "TokenSequences", "bucket", "generate", "install", "linear", "rules", "sampling_params"]
