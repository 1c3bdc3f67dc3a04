"""velo_scale: VeLO, the versatile learned optimizer, for large-model training.

Public API:
  velo                   the optax transformation (`update(..., loss=loss)`)
  extend_horizon         continue a run past num_steps (naive / increase / reset)
  lr_mult                per-tensor step-size multiplier of the last step
  effective_step_size    per-tensor rms(update) / rms(param)
  schedule_metrics       both, averaged by tensor role, as flat scalars
  load_weights           read the official `params` file (path, URL or default)
  save_weights           write meta-parameters in the same format
  init_weights           random meta-parameters of a given architecture
  Architecture           sizes of the VeLO network
  state_partition_specs  PartitionSpecs of the state, derived from the params'
  state_shardings        the same as NamedShardings on a mesh
"""

from velo_scale._src.horizon import extend_horizon
from velo_scale._src.schedule import effective_step_size, lr_mult, schedule_metrics
from velo_scale._src.sharding import (
    ShardingError,
    mesh_param_specs,
    state_partition_specs,
    state_shardings,
)
from velo_scale._src.state import (
    AccumulationState,
    FactoredState,
    LossBufferState,
    VeLOState,
)
from velo_scale._src.velo import velo, velo_step
from velo_scale._src.weights import (
    OFFICIAL_WEIGHTS_BYTES,
    OFFICIAL_WEIGHTS_URL,
    Architecture,
    WeightsError,
    default_cache_path,
    init_weights,
    load_weights,
    save_weights,
)

__version__ = "0.1.0"

__all__ = [
    "AccumulationState",
    "Architecture",
    "FactoredState",
    "LossBufferState",
    "OFFICIAL_WEIGHTS_BYTES",
    "OFFICIAL_WEIGHTS_URL",
    "ShardingError",
    "VeLOState",
    "WeightsError",
    "default_cache_path",
    "effective_step_size",
    "extend_horizon",
    "init_weights",
    "load_weights",
    "lr_mult",
    "mesh_param_specs",
    "save_weights",
    "schedule_metrics",
    "state_partition_specs",
    "state_shardings",
    "velo",
    "velo_step",
]
