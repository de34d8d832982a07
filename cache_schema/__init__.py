"""The contract between the two stages: what a feature cache holds and how to trust it.

`precompute` writes through `CacheWriter`; `trainer` reads through `SplitReader`; both agree on
`FeatureSpec` (what made a feature) and `CommitRecord` (proof that a shard is complete).
"""

from cache_schema.commit import CommitRecord, keys_digest
from cache_schema.layout import SCHEMA_VERSION, CacheError, CacheLayout
from cache_schema.models import load_timm_model
from cache_schema.reader import FeatureReader, SplitReader, list_splits
from cache_schema.tables import ClassTable, read_table, write_table
from cache_schema.spec import TEXT_DTYPE, ArraySpec, FeatureSpec, SpecMismatchError, config_hash, model_revision
from cache_schema.validate import PendingShards, ShardProblem, pending_shards, validate_cache
from cache_schema.writer import CacheWriter, SplitPlan

__all__ = [
    "SCHEMA_VERSION",
    "TEXT_DTYPE",
    "ArraySpec",
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
    "pending_shards",
    "read_table",
    "validate_cache",
    "write_table",
]
