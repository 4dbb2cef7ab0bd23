"""torch.distributed for langfield: one process per device, launched by ``torchrun``.

- :mod:`.core`: joining the job from the environment, collectives with timeouts and errors
  that name the rank that stopped, consistency checks (configuration, data, parameter hash).
- :mod:`.dp`: data-parallel training helpers (a multi-camera batch split over the ranks,
  densification statistics reduced before gsplat's DefaultStrategy decides).
- :mod:`.shard`: Gaussian-sharded rendering (each rank owns a spatial shard; every camera
  renders the visible Gaussians of all shards; gradients go back to the owners).

Nothing here changes a single-process run: without ``WORLD_SIZE`` no group is created and
every helper is the identity.
"""

from .core import (DEFAULT_TIMEOUT_S, alone, Dist, DistError, all_reduce_grads, barrier, broadcast_params,  # noqa: F401
                   env_world_size, get, guard_main, init, is_main, params_hash, print_main, rank, shutdown,
                   world_size)

__all__ = ["Dist", "DistError", "init", "get", "shutdown", "is_main", "rank", "world_size", "barrier",
           "all_reduce_grads", "broadcast_params", "params_hash", "env_world_size", "guard_main", "print_main",
           "DEFAULT_TIMEOUT_S", "alone"]
