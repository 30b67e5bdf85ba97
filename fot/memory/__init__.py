"""Inference memory: per memory layer a FIFO key/value store (pure functions over a pytree)."""
from fot.memory.store import (
    MemoryStore,
    append,
    clear,
    constrain,
    for_appends,
    init_store,
    memory_views,
    overflow_report,
    realign,
    reset,
    shard_store,
    store_sharding,
    store_spec,
    stores_for_model,
    would_evict,
)

__all__ = [
    "MemoryStore", "append", "clear", "constrain", "for_appends", "init_store", "memory_views", "overflow_report",
    "realign", "reset", "shard_store", "store_sharding", "store_spec", "stores_for_model", "would_evict",
]
