"""The artifact contract shared by the compiler and the runtime (stdlib only).

`buckets` decides which static shapes get a graph, `kv_cache` fixes the paged
cache layout, `manifest` describes and checks an artifact directory.
"""

from aotllm.graphs.buckets import Bucket, BucketPlan, pad_to_bucket, plan_buckets
from aotllm.graphs.kv_cache import NULL_BLOCK, KVCacheSpec
from aotllm.graphs.manifest import (
    FORMAT_VERSION,
    ArtifactError,
    GraphEntry,
    Manifest,
    check_files,
    check_runtime_compat,
    is_artifact_dir,
    sha256_file,
    verify_files,
)

__all__ = [
    "FORMAT_VERSION",
    "NULL_BLOCK",
    "ArtifactError",
    "Bucket",
    "BucketPlan",
    "GraphEntry",
    "KVCacheSpec",
    "Manifest",
    "check_files",
    "check_runtime_compat",
    "is_artifact_dir",
    "pad_to_bucket",
    "plan_buckets",
    "sha256_file",
    "verify_files",
]
