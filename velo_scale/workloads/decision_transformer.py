"""Offline RL with a Decision Transformer (Chen et al. 2021) on MuJoCo Hopper.

Training is supervised: the mean squared error of the predicted actions over
the real (unpadded) steps of K-step windows (`velo_scale.data.hopper`).
Batches: `{"returns_to_go": f32[b, K, 1], "states": f32[b, K, 11],
"actions": f32[b, K, 3], "timesteps": i32[b, K], "mask": f32[b, K]}`.

Evaluation: the action MSE on the eval windows ("loss"), then the policy
itself: `rollout_episodes` episodes of gymnasium's `Hopper-v5`, the model
conditioned on `target_return` (decremented by each reward, as in the paper)
and on the last K steps. It reports the mean undiscounted episode return
("return") and D4RL's normalised score ("normalized_return"),
100 * (R - random) / (expert - random) with D4RL's Hopper references.

The published target: the paper's hopper-medium score, 67.6 (Table 2), after
100k AdamW steps of batch 64. There is no AlgoPerf target for this workload.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from velo_scale.data.iterator import epoch_batches
from velo_scale.models.decision_transformer import DecisionTransformer, num_params
from velo_scale.workloads.base import FullScale, Workload, gin_configurables

# D4RL's reference returns for Hopper (d4rl/infos.py REF_MIN/MAX_SCORE).
HOPPER_RANDOM_SCORE = -20.272305
HOPPER_EXPERT_SCORE = 3234.3

# The paper's gym setting on hopper-medium (no AlgoPerf target exists).
FULL_SCALE = FullScale(
    target_metric="normalized_return",
    target_value=67.6,
    higher_is_better=True,
    step_hint=100_000,
    batch_size=64,
    num_params=num_params(state_dim=11, act_dim=3),  # 726,019
)


def normalized_score(
    episode_return: float | np.ndarray,
    random_score: float = HOPPER_RANDOM_SCORE,
    expert_score: float = HOPPER_EXPERT_SCORE,
) -> float | np.ndarray:
    """D4RL's normalised score: 0 = random policy, 100 = D4RL's expert."""
    return 100.0 * (episode_return - random_score) / (expert_score - random_score)


def masked_action_se(
    predicted: jax.Array, actions: jax.Array, mask: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Sum of squared action errors over real steps, and how many entries
    entered it. predicted, actions: [b, K, a]; mask: [b, K] (1 = real)."""
    mask = mask.astype(jnp.float32)
    se = jnp.sum(jnp.square(predicted - actions) * mask[..., None])
    return se, jnp.sum(mask) * actions.shape[-1]


@dataclasses.dataclass(frozen=True, eq=False)
class DecisionTransformerWorkload(Workload):
    """A Decision Transformer trained on action MSE, evaluated in Hopper-v5.

    Attributes:
      model: a `DecisionTransformer` (its `state_dim`/`act_dim` set the
        batch shapes).
      context_length: K, steps per window (the data's K).
      target_return: the return the rollouts are conditioned on (the paper's
        Hopper targets: 3600 and 1800).
      return_scale: returns-to-go are divided by this (1000, as the data).
      rollout_episodes: episodes per evaluation (0: only the action MSE).
      max_episode_steps: rollout length limit (Hopper-v5: 1000).
      rollout_seed: episode i resets the environment with seed
        `rollout_seed + i`.
      env_id: the gymnasium environment.
      random_score, expert_score: the references of the normalised score.
      full_scale: the published workload facts.
    """

    model: nn.Module = dataclasses.field(default_factory=DecisionTransformer)
    context_length: int = 20
    target_return: float = 3600.0
    return_scale: float = 1000.0
    rollout_episodes: int = 10
    max_episode_steps: int = 1000
    rollout_seed: int = 0
    env_id: str = "Hopper-v5"
    random_score: float = HOPPER_RANDOM_SCORE
    expert_score: float = HOPPER_EXPERT_SCORE
    full_scale: FullScale | None = None

    # -- model calls -------------------------------------------------------
    def init_inputs(self, batch):
        return (
            batch["returns_to_go"],
            batch["states"],
            batch["actions"],
            batch["timesteps"],
            batch["mask"],
        )

    def dummy_batch(self, batch_size: int) -> dict[str, np.ndarray]:
        b, k = batch_size, self.context_length
        return {
            "returns_to_go": np.zeros((b, k, 1), np.float32),
            "states": np.zeros((b, k, self.model.state_dim), np.float32),
            "actions": np.zeros((b, k, self.model.act_dim), np.float32),
            "timesteps": np.zeros((b, k), np.int32),
            "mask": np.ones((b, k), np.float32),
        }

    def predict_actions(
        self, params: Any, model_state: Mapping[str, Any], batch: Mapping[str, Any]
    ) -> jax.Array:
        """a_t predictions, f32[b, K, act_dim] (no dropout)."""
        return self.model.apply(
            {"params": params, **model_state}, *self.init_inputs(batch)
        )

    # -- training ----------------------------------------------------------
    def loss(self, params, model_state, batch, rng):
        predicted = self.model.apply(
            {"params": params, **model_state},
            *self.init_inputs(batch),
            train=True,
            rngs={"dropout": rng},
        )
        se, count = masked_action_se(predicted, batch["actions"], batch["mask"])
        return se / jnp.maximum(count, 1.0), ({}, dict(model_state))

    # -- evaluation --------------------------------------------------------
    def eval_sums(self, params, model_state, batch):
        predicted = self.predict_actions(params, model_state, batch)
        se, count = masked_action_se(predicted, batch["actions"], batch["mask"])
        return {"loss": se, "count": count}

    def evaluate(self, params, model_state, source, batch_size):
        """Eval-window action MSE ("loss") and, if `rollout_episodes`, the
        rollout metrics of `rollouts`, with the state statistics of `source`
        (its `state_mean`/`state_std` attributes; identity if it has none)."""
        fn = self._jitted("eval_sums")
        se = count = 0.0
        for batch in epoch_batches(source, batch_size):
            sums = fn(
                params, model_state, {k: jnp.asarray(v) for k, v in batch.items()}
            )
            se, count = se + float(sums["loss"]), count + float(sums["count"])
        metrics = {"loss": se / max(count, 1.0)}
        if self.rollout_episodes > 0:
            dim = self.model.state_dim
            mean = getattr(source, "state_mean", np.zeros(dim, np.float32))
            std = getattr(source, "state_std", np.ones(dim, np.float32))
            metrics.update(self.rollouts(params, model_state, mean, std))
        return metrics

    def rollouts(
        self,
        params: Any,
        model_state: Mapping[str, Any],
        state_mean: np.ndarray,
        state_std: np.ndarray,
    ) -> dict[str, float]:
        """Runs the policy for `rollout_episodes` episodes in parallel.

        At step t the model sees the last K steps (left-padded early on):
        returns-to-go R_t = target - rewards so far (scaled), normalised
        states, the actions taken and the timesteps; it acts with its
        prediction at s_t.

        Returns:
          `{"return": mean episode return, "normalized_return": its D4RL
          score, "episode_length": mean steps}`.
        """
        from velo_scale.data.hopper import make_env

        n, k, horizon = (
            self.rollout_episodes,
            self.context_length,
            self.max_episode_steps,
        )
        sdim, adim = self.model.state_dim, self.model.act_dim
        max_t = self.model.max_timestep - 1
        envs = [make_env(self.env_id) for _ in range(n)]
        states = np.zeros((n, horizon, sdim), np.float32)
        actions = np.zeros((n, horizon, adim), np.float32)
        rtg = np.zeros((n, horizon), np.float32)
        obs = np.stack(
            [env.reset(seed=self.rollout_seed + i)[0] for i, env in enumerate(envs)]
        )
        goal = np.full(n, self.target_return / self.return_scale, np.float32)
        alive = np.ones(n, bool)
        returns = np.zeros(n)
        lengths = np.zeros(n, np.int64)
        act = self._jitted("predict_actions")
        for t in range(horizon):
            states[:, t] = (obs - state_mean) / state_std
            rtg[:, t] = goal
            lo = max(0, t - k + 1)
            m = t + 1 - lo  # real steps in the window
            window = np.zeros((n, k), np.int32)
            window[:, k - m :] = np.arange(lo, t + 1)
            mask = np.zeros((n, k), np.float32)
            mask[:, k - m :] = 1.0
            batch = {
                "returns_to_go": np.zeros((n, k, 1), np.float32),
                "states": np.zeros((n, k, sdim), np.float32),
                "actions": np.zeros((n, k, adim), np.float32),
                "timesteps": np.minimum(window, max_t) * (mask > 0),
                "mask": mask,
            }
            batch["returns_to_go"][:, k - m :, 0] = rtg[:, lo : t + 1]
            batch["states"][:, k - m :] = states[:, lo : t + 1]
            batch["actions"][:, k - m :] = actions[:, lo : t + 1]  # a_t: still 0.
            a = np.asarray(act(params, model_state, batch))[:, -1]
            actions[:, t] = a
            for i in np.flatnonzero(alive):
                obs[i], reward, terminated, _, _ = envs[i].step(a[i])
                returns[i] += reward
                lengths[i] += 1
                goal[i] -= reward / self.return_scale
                alive[i] = not terminated
            if not alive.any():
                break
        for env in envs:
            env.close()
        mean_return = float(returns.mean())
        return {
            "return": mean_return,
            "normalized_return": float(
                normalized_score(mean_return, self.random_score, self.expert_score)
            ),
            "episode_length": float(lengths.mean()),
        }


def decision_transformer_full_scale() -> FullScale:
    """`FULL_SCALE`, for gin (`full_scale = @decision_transformer_full_scale()`)."""
    return FULL_SCALE


GIN_CONFIGURABLES = gin_configurables(
    DecisionTransformer, DecisionTransformerWorkload, decision_transformer_full_scale
)
