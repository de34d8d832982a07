"""The contract between the two stages: what a feature cache holds and how to trust it.

`precompute` writes through `CacheWriter`; `trainer` and any PyTorch user read through
`open_cache` (-> `SplitReader`s -> `torch_dataset` / `iterable_dataset`); both agree on
`FeatureSpec` (what made a feature) and `CommitRecord` (proof that a shard is complete).
Importing this package does not import torch.
"""

from cache_schema.commit import PROFILE_STAGES, CommitRecord, keys_digest
from cache_schema.layout import SCHEMA_VERSION, CacheError, CacheLayout
from cache_schema.models import load_timm_model
from cache_schema.reader import Cache, FeatureReader, SplitReader, list_splits, open_cache
from cache_schema.spec import TEXT_DTYPE, VIEWS_ARRAY, ArraySpec, FeatureSpec, SpecMismatchError, config_hash, model_revision
from cache_schema.tables import ClassTable, read_table, write_table
from cache_schema.validate import PendingShards, ShardProblem, pending_shards, validate_cache
from cache_schema.writer import CacheWriter, SplitPlan

__all__ = [
    "SCHEMA_VERSION",
    "PROFILE_STAGES",
    "TEXT_DTYPE",
    "VIEWS_ARRAY",
    "ArraySpec",
    "Cache",
    "CacheError",
    "CacheLayout",
    "CacheWriter",
    "ClassTable",
    "CommitRecord",
    "FeatureReader",
    "FeatureSpec",
    "PendingShards",
    "ShardProblem",
    "SpecMismatchError",
    "SplitPlan",
    "SplitReader",
    "config_hash",
    "keys_digest",
    "list_splits",
    "load_timm_model",
    "model_revision",
    "open_cache",
    "pending_shards",
    "read_table",
    "validate_cache",
    "write_table",
]
