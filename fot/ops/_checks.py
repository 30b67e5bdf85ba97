"""Input validation shared by the fot.ops functions (ValueError naming the argument and shapes)."""
from __future__ import annotations

import jax
import numpy as np


def shape_of(x):
    return tuple(getattr(x, "shape", np.shape(x)))


def check_rank(name, x, rank):
    if len(shape_of(x)) != rank:
        raise ValueError(f"{name} must have rank {rank}, got shape {shape_of(x)}")


def check_qkv(q, k, v, *, allow_longer_keys=True):
    """q [B,Tq,H,Dh], k/v [B,Tk,Hkv,Dh] with H a multiple of Hkv (grouped-query attention)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_rank(name, x, 4)
    qs, ks, vs = shape_of(q), shape_of(k), shape_of(v)
    if ks != vs:
        raise ValueError(f"k and v must have the same shape, got k {ks} and v {vs}")
    if qs[0] != ks[0]:
        raise ValueError(f"q and k must agree in batch size, got q {qs} and k {ks}")
    check_kv_heads("k", ks, qs)
    if qs[3] != ks[3]:
        raise ValueError(f"head-dim mismatch: q {qs} vs k {ks}")
    if not allow_longer_keys and ks[1] != qs[1]:
        raise ValueError(f"q and k must have the same length, got q {qs} and k {ks}")


def check_kv_heads(name, ks, qs):
    """k heads Hkv >= 1 dividing the q heads H (H = Hkv: multi-head; Hkv = 1: multi-query)."""
    if ks[2] < 1 or qs[2] % ks[2]:
        raise ValueError(f"the {qs[2]} query heads of q {qs} must be a multiple of the {ks[2]} key/value heads "
                         f"of {name} {ks} (grouped-query attention)")


def check_segments(segment_ids, k):
    if segment_ids is None:
        return
    ss, ks = shape_of(segment_ids), shape_of(k)
    if ss != ks[:2]:
        raise ValueError(f"segment_ids must have shape [B, Tk] = {ks[:2]}, got {ss}")


def check_source(name_k, xk, name_v, xv, q, k=None):
    """Extra/memory keys [B', S, Hkv, Dh] compatible with q [B, T, H, Dh] (and with the local k's Hkv)."""
    check_rank(name_k, xk, 4)
    check_rank(name_v, xv, 4)
    xs, vs, qs = shape_of(xk), shape_of(xv), shape_of(q)
    if xs != vs:
        raise ValueError(f"{name_k} and {name_v} must have the same shape, got {xs} and {vs}")
    if xs[0] != qs[0]:
        raise ValueError(f"{name_k} must be [B, S, Hkv, Dh] with the batch size of q {qs}, got {xs}")
    check_kv_heads(name_k, xs, qs)
    if k is not None and xs[2] != shape_of(k)[2]:
        raise ValueError(f"{name_k} {xs} must have the key/value heads of k {shape_of(k)}")
    if xs[3] != qs[3]:
        raise ValueError(f"head-dim mismatch: {name_k} {xs} vs q {qs}")


def check_key_mask(name, mask, src):
    if mask is None:
        return
    ms, ss = shape_of(mask), shape_of(src)
    if ms != ss[:2]:
        raise ValueError(f"{name} must have shape {ss[:2]} ([B, S] of the keys {ss}), got {ms}")


def check_joint_inputs(q, k, v, segment_ids, name_k, xk, name_v, xv, name_mask, mask):
    """The local q/k/v (Tk >= Tq), their segment ids, and one extra/memory key source with its mask."""
    check_qkv(q, k, v)
    check_segments(segment_ids, k)
    if shape_of(k)[1] < shape_of(q)[1]:
        raise ValueError(f"k must have at least as many keys as q has queries, got q {shape_of(q)}, "
                         f"k {shape_of(k)}")
    check_source(name_k, xk, name_v, xv, q, k)
    check_key_mask(name_mask, mask, xk)


def concrete_or_none(x):
    """numpy value of x if it is concrete (not traced), else None."""
    if isinstance(x, jax.core.Tracer):
        return None
    try:
        return np.asarray(x)
    except Exception:  # pragma: no cover - abstract values
        return None


def mesh_axis(mesh, name):
    """`name` if the mesh has that axis, else None (so PartitionSpecs stay valid on any mesh)."""
    return name if (mesh is not None and name in mesh.axis_names) else None


def axis_size(mesh, name):
    return int(mesh.shape[name]) if (mesh is not None and name in mesh.axis_names) else 1


def check_divisible(argname, size, mesh, axis, what):
    n = axis_size(mesh, axis)
    if size % n:
        raise ValueError(f"{argname}: {what} ({size}) must be divisible by mesh axis '{axis}' ({n})")


def place(mesh, spec, *xs):
    """Arguments ready for jax.shard_map on `mesh`: explicit-axis meshes (jax.make_mesh default) need
    inputs whose sharding matches `spec`, so they are resharded; auto meshes let shard_map reshard."""
    explicit = any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types)
    if not explicit:
        return xs
    sh = jax.sharding.NamedSharding(mesh, spec)
    return tuple(jax.sharding.reshard(x, sh) for x in xs)
