"""Adapters that run VeLO inside other training systems.

  t5x   T5X/gin: an `OptaxWrapper` whose hyper-params carry the loss, a trainer
        that keeps the loss of `value_and_grad`, and logical axes for the state
        (`velo_scale.integrations.t5x`; gin configs in `gin_configs/t5x/`).
  pax   Pax/Praxis: `sharded_velo(...)`, a `ShardedGradientTransformation`,
        and `training_loss`, the hook that carries the loss through praxis'
        chains (`velo_scale.integrations.pax`); `pax_learner` (imports praxis
        and paxml): the `VeLO` optimizer, `VeLOLearner` and `configure_velo`;
        `pax_experiments`: example paxml experiments (Bible LM).

Each adapter imports its system lazily: importing `velo_scale`, `t5x` or `pax`
here never imports t5x or praxis, and their pure pieces work without them
(`pax_learner` and `pax_experiments` are for Pax programs and import it).
"""
