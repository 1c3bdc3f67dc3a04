"""Adapters that run VeLO inside other training systems.

  t5x   T5X/gin: an `OptaxWrapper` whose hyper-params carry the loss, a trainer
        that keeps the loss of `value_and_grad`, and logical axes for the state
        (`velo_scale.integrations.t5x`; gin configs in `gin_configs/t5x/`).
  pax   Pax/Praxis: `sharded_velo(...)`, a `ShardedGradientTransformation`
        (`velo_scale.integrations.pax`).

Each adapter imports its system lazily: importing `velo_scale` or these modules
never imports t5x or praxis, and their pure pieces work without them.
"""
