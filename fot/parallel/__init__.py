"""Device meshes, logical-axis sharding rules (the only module that names mesh axes) and, in
``fot.parallel.multihost``, what runs spanning several processes need."""
from fot.parallel.mesh import DATA_AXIS, MODEL_AXIS, make_mesh, mesh_axis_sizes, mesh_shape_from_config
from fot.parallel.rules import (
    DEFAULT_RULES,
    axis_rules,
    logical_to_spec,
    param_partition_specs,
    param_shardings,
    shard_params,
    with_logical_constraint,
)

__all__ = [
    "DATA_AXIS", "MODEL_AXIS", "make_mesh", "mesh_axis_sizes", "mesh_shape_from_config", "DEFAULT_RULES", "axis_rules",
    "logical_to_spec", "param_partition_specs", "param_shardings", "shard_params",
    "with_logical_constraint",
]
