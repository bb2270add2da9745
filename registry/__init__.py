"""krasis model registry: SQLite records, the model store on disk, pulls and cache builds."""

from .errors import (
    CacheNotReady,
    InvalidName,
    ModelInUse,
    ModelNotFound,
    PullError,
    RegistryError,
    StorageFull,
)
from .registry import Registry

__all__ = [
    "CacheNotReady",
    "InvalidName",
    "ModelInUse",
    "ModelNotFound",
    "PullError",
    "Registry",
    "RegistryError",
    "StorageFull",
]
