"""Logical axis rules (logical name → mesh axis) and helpers to turn them into shardings.

Params carry logical names through ``nn.with_logical_partitioning``; activations are constrained
with :func:`with_logical_constraint`. Logical names used by ``fot.model``:

=============  ==========================================  ====================
logical name   where                                       mesh axis (default)
=============  ==========================================  ====================
batch          activation batch                            data
length         activation sequence                         None
act_embed      activation model width                      None
embed          param model width (in/out of Dense, Embed)  None  (``fsdp=True``: data)
heads          q out, o in (H*Dh), per-head params,        model
               activation heads axis
kv_heads       k/v out (Hkv*Dh), k/v activation heads     model
head_dim       activation head dim                         None
mlp            SwiGLU hidden (params and activations)      model
vocab          embedding rows, LM head out, logits         model
norm           RMSNorm scales                              None
mem_length     inference memory slots                      None  (``shard_memory_length=True``: model)
=============  ==========================================  ====================

Rules whose mesh axis is absent from a mesh, or that do not divide the array dimension, fall back
to replication for that dimension (so one rules table serves ``('data',)`` and ``('data','model')``
meshes and odd vocab sizes).
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from fot.parallel.mesh import DATA_AXIS, MODEL_AXIS, mesh_axis_sizes

Rules = Sequence[tuple[str, Any]]


def axis_rules(fsdp: bool = False, shard_memory_length: bool = False) -> tuple[tuple[str, Any], ...]:
    """The logical→mesh rules table (see module docstring). ``fsdp`` shards params' ``embed`` over data."""
    return (
        ("batch", DATA_AXIS),
        ("length", None),
        ("act_embed", None),
        ("embed", DATA_AXIS if fsdp else None),
        ("heads", MODEL_AXIS),
        ("kv_heads", MODEL_AXIS),
        ("head_dim", None),
        ("mlp", MODEL_AXIS),
        ("vocab", MODEL_AXIS),
        ("norm", None),
        ("mem_length", MODEL_AXIS if shard_memory_length else None),
    )


DEFAULT_RULES = axis_rules()


def _rules(rules: Rules | None) -> Rules:
    if rules is not None:
        return tuple(rules)
    ctx = nn.get_logical_axis_rules()
    return tuple(ctx) if ctx else DEFAULT_RULES


def _fit(spec: PartitionSpec, shape: Sequence[int] | None, mesh) -> PartitionSpec:
    """Drop mesh axes unknown to ``mesh`` or not dividing the dimension (→ replicated)."""
    if mesh is None:
        return spec
    sizes = mesh_axis_sizes(mesh)
    out = []
    for i, entry in enumerate(spec):
        axes = entry if isinstance(entry, tuple) else (entry,)
        axes = tuple(a for a in axes if a is not None and a in sizes)
        if shape is not None and axes:
            total = 1
            for a in axes:
                total *= sizes[a]
            if i >= len(shape) or shape[i] % total:
                axes = ()
        out.append(None if not axes else (axes[0] if len(axes) == 1 else axes))
    while out and out[-1] is None:
        out.pop()
    return PartitionSpec(*out)


def logical_to_spec(names: Sequence[str | None], rules: Rules | None = None, mesh=None,
                    shape: Sequence[int] | None = None) -> PartitionSpec:
    """Logical axis names (one per dim) → mesh ``PartitionSpec``; with ``mesh`` (and ``shape``) fitted to it."""
    spec = nn.logical_to_mesh_axes(tuple(names), _rules(rules))
    return _fit(PartitionSpec(*spec), shape, mesh)


def _is_spec(x) -> bool:
    return isinstance(x, PartitionSpec)


def param_partition_specs(variables: Any, rules: Rules | None = None, mesh=None) -> Any:
    """Tree of mesh ``PartitionSpec``s for a (boxed, e.g. ``jax.eval_shape(model.init, ...)``) variables tree.

    Leaves without logical metadata are replicated. With ``mesh`` the specs are fitted to it
    (unknown axes / non-dividing sizes dropped).
    """
    logical = nn.get_partition_spec(variables)
    shapes = jax.tree.map(lambda x: tuple(x.shape), nn.meta.unbox(variables))
    return jax.tree.map(lambda s, shp: logical_to_spec(tuple(s), rules, mesh, shp), logical, shapes,
                        is_leaf=_is_spec)


def param_shardings(variables: Any, mesh: Mesh, rules: Rules | None = None) -> Any:
    """Tree of ``NamedSharding`` (same structure as the unboxed variables) for ``mesh``."""
    specs = param_partition_specs(variables, rules, mesh)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=_is_spec)


def shard_params(variables: Any, mesh: Mesh, rules: Rules | None = None) -> Any:
    """Unbox ``variables`` and place every leaf on ``mesh`` with its logical sharding."""
    shardings = param_shardings(variables, mesh, rules)
    return jax.device_put(nn.meta.unbox(variables), shardings)


def with_logical_constraint(x: jax.Array, names: Sequence[str | None], mesh: Mesh | None = None,
                            rules: Rules | None = None) -> jax.Array:
    """``jax.lax.with_sharding_constraint`` from logical names (also active on CPU).

    ``mesh`` defaults to the mesh in context (``jax.set_mesh`` / ``with mesh:``); with no mesh at all
    this is the identity.
    """
    if len(names) != x.ndim:
        raise ValueError(f"with_logical_constraint: names {tuple(names)} do not match x.shape {x.shape}")
    if mesh is None:
        ctx = jax.sharding.get_abstract_mesh()
        if ctx is None or ctx.empty:
            return x
        spec = logical_to_spec(names, rules, ctx, x.shape)
        return jax.lax.with_sharding_constraint(x, spec)
    spec = logical_to_spec(names, rules, mesh, x.shape)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
