"""Device meshes built from a small config such as ``{"data": -1, "model": 1}``.

The mesh axes are ``data`` (batch; optional FSDP of params) and ``model`` (heads / MLP / vocab).
Axes are created with ``AxisType.Auto`` so GSPMD sharding constraints and ``jax.shard_map`` both
work on them (``jax.make_mesh`` would default to ``Explicit`` axes).
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

DATA_AXIS = "data"
MODEL_AXIS = "model"

MeshConfig = Mapping[str, int] | Sequence[tuple[str, int]]


def _items(config: MeshConfig | None) -> list[tuple[str, int]]:
    if config is None:
        return [(DATA_AXIS, -1), (MODEL_AXIS, 1)]
    items = list(config.items()) if isinstance(config, Mapping) else [tuple(x) for x in config]
    if not items:
        raise ValueError(f"mesh config must name at least one axis, got {config!r}")
    for item in items:
        if len(item) != 2 or not isinstance(item[0], str):
            raise ValueError(f"mesh config entries must be (axis_name, size), got {item!r}")
    names = [n for n, _ in items]
    if len(set(names)) != len(names):
        raise ValueError(f"mesh config repeats an axis name: {names}")
    return [(n, int(s)) for n, s in items]


def mesh_shape_from_config(config: MeshConfig | None, num_devices: int) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """Resolve ``{"data": -1, "model": 2}`` against ``num_devices`` → (names, sizes).

    At most one axis may be ``-1``; it takes ``num_devices // prod(other sizes)``. The product of the
    resolved sizes must equal ``num_devices``.
    """
    items = _items(config)
    names = tuple(n for n, _ in items)
    sizes = [s for _, s in items]
    fill = [i for i, s in enumerate(sizes) if s == -1]
    if len(fill) > 1:
        raise ValueError(f"mesh config may have at most one -1 axis, got {dict(items)}")
    bad = [s for s in sizes if s != -1 and s < 1]
    if bad:
        raise ValueError(f"mesh axis sizes must be >= 1 or -1, got {dict(items)}")
    fixed = math.prod(s for s in sizes if s != -1)
    if fill:
        if num_devices % fixed:
            raise ValueError(
                f"mesh config {dict(items)}: {num_devices} devices not divisible by the fixed axes' product {fixed}")
        sizes[fill[0]] = num_devices // fixed
    if math.prod(sizes) != num_devices:
        raise ValueError(
            f"mesh config {dict(items)} has {math.prod(sizes)} devices, but {num_devices} devices were given")
    return names, tuple(sizes)


def make_mesh(config: MeshConfig | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Build a ``jax.sharding.Mesh`` from ``{"axis": size}`` (ordered; ``-1`` fills; default ``{"data": -1, "model": 1}``).

    ``devices`` defaults to ``jax.devices()``; all of them are used.
    """
    devices = list(jax.devices() if devices is None else devices)
    names, sizes = mesh_shape_from_config(config, len(devices))
    try:
        return jax.make_mesh(sizes, names, axis_types=(AxisType.Auto,) * len(names), devices=devices)
    except (ValueError, NotImplementedError, AssertionError):
        # Device kinds without a topology-aware layout: plain row-major order.
        return Mesh(np.asarray(devices, dtype=object).reshape(sizes), names,
                    axis_types=(AxisType.Auto,) * len(names))


def mesh_axis_sizes(mesh) -> dict[str, int]:
    """``{axis name: size}`` of a ``Mesh`` (or an ``AbstractMesh``)."""
    return dict(zip(mesh.axis_names, mesh.axis_sizes if hasattr(mesh, "axis_sizes") else mesh.devices.shape))
