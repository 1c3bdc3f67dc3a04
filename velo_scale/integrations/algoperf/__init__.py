"""VeLO as an MLCommons AlgoPerf (algorithms track, JAX) submission.

`submission.py` in this package is the file the AlgoPerf runner loads:
`submission_runner.py --framework=jax
--submission_path=velo_scale/integrations/algoperf/submission.py ...` (see
README.md here for the full commands). It imports `algoperf` lazily, only for
`spec.ForwardPassMode`, so its helpers run and are tested without AlgoPerf:

  velo_num_steps        VeLO's `num_steps` from a workload's `step_hint`
  accumulation_steps    calls per VeLO step (2 past VeLO's 150k horizon)
  batch_size_for        per-workload global batch sizes (the NAdamW baselines')
  fsdp_param_specs      FSDP-style specs over the 'batch' mesh axis
  velo_update_step      loss + grads + VeLO update, pure and jittable

This package is never imported by `velo_scale` itself.
"""
