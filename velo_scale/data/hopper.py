"""Offline MuJoCo Hopper trajectories for the Decision Transformer.

Two sources, one format (D4RL's flat arrays: `observations` f32[N, 11],
`actions` f32[N, 3], `rewards` f32[N], `terminals` bool[N], `timeouts` bool[N];
an episode ends at a step where `terminals | timeouts`):

* The project's own data (`data_dir=None`): a linear policy is trained on
  gymnasium's `Hopper-v5` with augmented random search (ARS V2-t, Mania et
  al. 2018: antithetic perturbations, top-b directions, reward-std step
  scaling, online observation normalisation, survival bonus removed during
  training). Then a D4RL-like mixture is rolled out: uniformly random actions
  ("random"), a mid-training ARS checkpoint ("medium") and the final one
  ("expert"), the last two with a little Gaussian action noise. Everything is
  seeded, so the same recipe gives the same arrays on one machine; the result
  is cached as an npz under `$VELO_SCALE_CACHE` (default
  `~/.cache/velo_scale`)/hopper, written atomically. The "full" recipe
  (default) takes a few minutes of CPU once; `$VELO_SCALE_HOPPER_PRESET=tiny`
  (or `generate_hopper_dataset(...)` with small arguments) makes a small one
  in seconds for tests.
* A real D4RL dataset (`data_dir` = a directory holding
  `hopper-medium-v2.hdf5` or `.npz`, or the path of such a file); `.hdf5`
  needs h5py.

`load_hopper(split, data_dir)` cuts the episodes into context windows of K=20
steps for the Decision Transformer (Chen et al. 2021): one window starts at
every step of every episode (so windows are sampled like the official code,
uniformly over timesteps), and windows that run past the episode's end are
left-padded. A window is

    states         f32[K, 11]  (s - state_mean) / state_std
    actions        f32[K, 3]   in [-1, 1]
    returns_to_go  f32[K, 1]   sum of the episode's rewards from t on, / 1000
    timesteps      i32[K]      step t within the episode, < 1000
    mask           f32[K]      1 for real steps, 0 for padding (on the left)

The split is by episode (10% of each policy's episodes, chosen with a fixed
seed, are "test"); the normalisation statistics come from the train episodes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from velo_scale.data import cache as cache_lib

ENV_ID = "Hopper-v5"
STATE_DIM = 11
ACT_DIM = 3
CONTEXT_LENGTH = 20
MAX_EPISODE_STEPS = 1000
RETURN_SCALE = 1000.0
TEST_FRACTION = 0.1
SPLIT_SEED = 0
PRESET_ENV = "VELO_SCALE_HOPPER_PRESET"
CACHE_ENV = "VELO_SCALE_CACHE"
D4RL_FILES = ("hopper-medium-v2.hdf5", "hopper-medium-v2.npz")
D4RL_KEYS = ("observations", "actions", "rewards", "terminals", "timeouts")
POLICIES = ("random", "medium", "expert")
_EXTRA_KEYS = ("policy", "info")  # In the project's generated files.


@dataclasses.dataclass(frozen=True)
class Generation:
    """How the project's Hopper data are made.

    Attributes:
      seed: seeds ARS, the environment resets and the action noise.
      ars_iterations: ARS updates of the linear policy.
      ars_directions: N, random directions per update (2N episodes).
      ars_top: b, the best directions used in the update.
      ars_step_size: alpha.
      ars_noise: nu, the std of the parameter perturbations.
      survival_shift: subtracted from every training reward (Hopper's
        healthy reward), as ARS does for Hopper.
      eval_every: the unperturbed policy is evaluated (`eval_episodes`
        episodes) every this many updates; these are the checkpoints.
      eval_episodes: episodes per checkpoint evaluation.
      episodes: (random, medium, expert) episodes rolled out for the dataset.
      medium_fraction: "medium" is the checkpoint whose evaluated return is
        closest to this fraction of the final ("expert") return.
      action_noise: std of the Gaussian noise added to the medium and expert
        actions (then clipped to [-1, 1]).
      max_episode_steps: episode time limit (Hopper-v5's is 1000).
    """

    seed: int = 0
    ars_iterations: int = 120
    ars_directions: int = 8
    ars_top: int = 4
    ars_step_size: float = 0.01
    ars_noise: float = 0.025
    survival_shift: float = 1.0
    eval_every: int = 5
    eval_episodes: int = 3
    episodes: tuple[int, int, int] = (200, 60, 60)
    medium_fraction: float = 0.5
    action_noise: float = 0.1
    max_episode_steps: int = MAX_EPISODE_STEPS

    def fingerprint(self) -> str:
        """A short hash of the fields (names the cache file)."""
        text = json.dumps(dataclasses.asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


PRESETS: dict[str, Generation] = {
    # The small recipe's data: minutes of CPU, once.
    "full": Generation(),
    # For tests: a few seconds.
    "tiny": Generation(
        ars_iterations=2,
        ars_directions=2,
        ars_top=1,
        eval_every=1,
        eval_episodes=1,
        episodes=(6, 3, 3),
        max_episode_steps=100,
    ),
}


# -- augmented random search ---------------------------------------------------


class LinearPolicy(NamedTuple):
    """a = clip(M (s - mean) / std, -1, 1).

    weights: f32[act_dim, state_dim] (M); mean, std: f32[state_dim].
    """

    weights: np.ndarray
    mean: np.ndarray
    std: np.ndarray

    def __call__(self, state: np.ndarray) -> np.ndarray:
        return np.clip(self.weights @ ((state - self.mean) / self.std), -1.0, 1.0)


class _RunningStats:
    """Mean and std of every state seen (ARS V2's observation filter)."""

    def __init__(self, dim: int):
        self.count = 0
        self.sum = np.zeros(dim)
        self.sum_sq = np.zeros(dim)

    def update(self, states: np.ndarray) -> None:
        self.count += len(states)
        self.sum += states.sum(0)
        self.sum_sq += np.square(states).sum(0)

    def mean_std(self) -> tuple[np.ndarray, np.ndarray]:
        if self.count < 2:
            return np.zeros_like(self.sum), np.ones_like(self.sum)
        mean = self.sum / self.count
        var = np.maximum(self.sum_sq / self.count - mean**2, 0.0)
        std = np.sqrt(var)
        return mean, np.where(std < 1e-8, 1.0, std)


def make_env(env_id: str = ENV_ID):
    """The gymnasium environment (default `Hopper-v5`) without wrappers (its
    1000-step limit is applied by the callers).

    Raises:
      ImportError: gymnasium, mujoco or imageio is missing.
    """
    try:
        import gymnasium as gym

        return gym.make(env_id).unwrapped
    except ImportError as e:
        raise ImportError(
            f"The Hopper data and rollouts need gymnasium's MuJoCo {env_id}: "
            "`pip install 'gymnasium[mujoco]>=1.0'` (gymnasium, mujoco and "
            f"imageio). ({e})"
        ) from e


def rollout(
    env: Any,
    policy: Callable[[np.ndarray], np.ndarray] | None,
    *,
    seed: int,
    max_steps: int,
    rng: np.random.Generator | None = None,
    action_noise: float = 0.0,
    reward_shift: float = 0.0,
) -> dict[str, np.ndarray]:
    """One episode: `policy(state) -> action`, or uniform random actions when
    `policy` is None.

    Returns:
      `{"observations": f32[T, 11], "actions": f32[T, 3], "rewards": f32[T]
      (environment rewards, minus `reward_shift`), "terminal": bool (the
      hopper fell, as opposed to the time limit)}`.
    """
    rng = rng if rng is not None else np.random.default_rng(seed)
    state, _ = env.reset(seed=int(seed))
    low, high = env.action_space.low, env.action_space.high
    states, actions, rewards = [], [], []
    terminal = False
    for _ in range(max_steps):
        if policy is None:
            action = rng.uniform(low, high)
        else:
            action = policy(state)
            if action_noise:
                action = action + action_noise * rng.standard_normal(action.shape)
            action = np.clip(action, low, high)
        states.append(state)
        actions.append(action)
        state, reward, terminal, _, _ = env.step(action)
        rewards.append(reward - reward_shift)
        if terminal:
            break
    return {
        "observations": np.asarray(states, np.float32),
        "actions": np.asarray(actions, np.float32),
        "rewards": np.asarray(rewards, np.float32),
        "terminal": bool(terminal),
    }


class Checkpoint(NamedTuple):
    """A policy from ARS training and its evaluated (unshifted) mean return."""

    iteration: int
    policy: LinearPolicy
    mean_return: float


def augmented_random_search(
    env: Any,
    config: Generation,
    log: Callable[[str], None] | None = None,
) -> list[Checkpoint]:
    """Trains a linear policy with ARS V2-t (Mania et al. 2018, Algorithm 2).

    Each update draws N directions delta_k ~ N(0, I), runs the episodes of
    M +- nu delta_k (states normalised with the statistics of all states seen
    so far), keeps the b directions with the largest max(r+, r-) and steps
    M += alpha / (b sigma_R) sum_k (r+_k - r-_k) delta_k, with sigma_R the
    std of those 2b returns.

    Returns:
      The checkpoints (iteration 0, every `eval_every` updates and the last
      one), each with its mean return over `eval_episodes` episodes.
    """
    rng = np.random.default_rng([config.seed, 1])
    weights = np.zeros((ACT_DIM, STATE_DIM))
    stats = _RunningStats(STATE_DIM)
    checkpoints: list[Checkpoint] = []
    n, b = config.ars_directions, config.ars_top
    start = time.time()

    def evaluate(iteration: int) -> None:
        mean, std = stats.mean_std()
        policy = LinearPolicy(weights.copy(), mean, std)
        returns = [
            rollout(env, policy, seed=int(rng.integers(2**31)),
                    max_steps=config.max_episode_steps)["rewards"].sum()
            for _ in range(config.eval_episodes)
        ]  # fmt: skip
        checkpoints.append(Checkpoint(iteration, policy, float(np.mean(returns))))
        if log:
            log(
                f"ARS iteration {iteration}: return {np.mean(returns):.1f} "
                f"({time.time() - start:.0f} s)"
            )

    evaluate(0)
    for iteration in range(1, config.ars_iterations + 1):
        mean, std = stats.mean_std()
        deltas = rng.standard_normal((n, ACT_DIM, STATE_DIM))
        returns = np.zeros((n, 2))
        seen = []
        for k in range(n):
            for j, sign in enumerate((1.0, -1.0)):
                policy = LinearPolicy(
                    weights + sign * config.ars_noise * deltas[k], mean, std
                )
                episode = rollout(
                    env,
                    policy,
                    seed=int(rng.integers(2**31)),
                    max_steps=config.max_episode_steps,
                    reward_shift=config.survival_shift,
                )
                returns[k, j] = episode["rewards"].sum()
                seen.append(episode["observations"])
        top = np.argsort(-returns.max(axis=1))[:b]
        sigma = returns[top].std()
        sigma = sigma if sigma > 1e-8 else 1.0
        step = np.tensordot(returns[top, 0] - returns[top, 1], deltas[top], axes=1)
        weights = weights + config.ars_step_size / (b * sigma) * step
        stats.update(np.concatenate(seen).astype(np.float64))
        if iteration % config.eval_every == 0 or iteration == config.ars_iterations:
            evaluate(iteration)
    return checkpoints


# -- the dataset ----------------------------------------------------------------


def _concat_episodes(episodes: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
    """D4RL's flat arrays from a list of `rollout` episodes."""
    arrays: dict[str, list[np.ndarray]] = {k: [] for k in D4RL_KEYS}
    for ep in episodes:
        t = len(ep["rewards"])
        terminals = np.zeros(t, bool)
        timeouts = np.zeros(t, bool)
        if ep["terminal"]:
            terminals[-1] = True
        else:  # Ended by the time limit.
            timeouts[-1] = True
        arrays["observations"].append(ep["observations"])
        arrays["actions"].append(ep["actions"])
        arrays["rewards"].append(ep["rewards"])
        arrays["terminals"].append(terminals)
        arrays["timeouts"].append(timeouts)
    return {k: np.concatenate(v) for k, v in arrays.items()}


def generate_hopper_dataset(
    path: str | os.PathLike | None = None,
    config: Generation | None = None,
    log: Callable[[str], None] | None = print,
    **overrides: Any,
) -> dict[str, np.ndarray]:
    """Trains ARS on Hopper-v5 and rolls out the random/medium/expert mixture.

    Args:
      path: where to write the npz (atomically); None: do not write.
      config: the recipe (default `PRESETS["full"]`); `overrides` replace
        its fields, e.g. `ars_iterations=2, episodes=(4, 2, 2)`.
      log: progress lines (None: silent).

    Returns:
      D4RL's flat arrays (`observations`, `actions`, `rewards`, `terminals`,
      `timeouts`) plus `policy` int8[N] (index into `POLICIES`) and
      `info`, a JSON string (the recipe, the checkpoint returns, the mean
      return of each policy's episodes).
    """
    config = dataclasses.replace(config or PRESETS["full"], **overrides)
    env = make_env()
    checkpoints = augmented_random_search(env, config, log)
    expert = checkpoints[-1]
    goal = config.medium_fraction * expert.mean_return
    medium = min(
        checkpoints[:-1] or checkpoints, key=lambda c: abs(c.mean_return - goal)
    )
    rng = np.random.default_rng([config.seed, 2])
    policies = {"random": None, "medium": medium.policy, "expert": expert.policy}
    episodes, labels, mean_returns = [], [], {}
    for label, (name, count) in enumerate(zip(POLICIES, config.episodes)):
        returns = []
        for _ in range(count):
            ep = rollout(
                env,
                policies[name],
                seed=int(rng.integers(2**31)),
                max_steps=config.max_episode_steps,
                rng=rng,
                action_noise=config.action_noise if name != "random" else 0.0,
            )
            episodes.append(ep)
            labels.append(np.full(len(ep["rewards"]), label, np.int8))
            returns.append(float(ep["rewards"].sum()))
        mean_returns[name] = float(np.mean(returns)) if returns else float("nan")
        if log:
            log(f"{name}: {count} episodes, mean return {mean_returns[name]:.1f}")
    data = _concat_episodes(episodes)
    data["policy"] = np.concatenate(labels)
    info = {
        "env": ENV_ID,
        "generation": dataclasses.asdict(config),
        "checkpoints": [(c.iteration, c.mean_return) for c in checkpoints],
        "medium_iteration": medium.iteration,
        "expert_iteration": expert.iteration,
        "mean_return": mean_returns,
    }
    data["info"] = np.asarray(json.dumps(info))
    if path is not None:
        cache_lib.save_npz_atomic(path, data)
    return data


def cache_dir() -> pathlib.Path:
    """The Hopper cache: `velo_scale.data.cache.cache_dir("hopper")`."""
    return cache_lib.cache_dir("hopper")


def generated_file_name(config: Generation) -> str:
    return f"hopper-v5-ars-mixed-{config.fingerprint()}.npz"


def preset() -> Generation:
    """The generation recipe named by `$VELO_SCALE_HOPPER_PRESET` (default
    "full")."""
    name = os.environ.get(PRESET_ENV) or "full"
    if name not in PRESETS:
        raise ValueError(
            f"${PRESET_ENV}={name!r} is not a Hopper data preset; use one of "
            f"{sorted(PRESETS)}."
        )
    return PRESETS[name]


def read_d4rl(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """D4RL's flat arrays from an `.hdf5` (needs h5py) or `.npz` file (plus
    `policy` and `info` when the file is the project's generated data).

    Older D4RL files without `timeouts` get all-False timeouts (episodes then
    end only at terminals and at the end of the file).
    """
    path = pathlib.Path(path)
    if path.suffix in (".hdf5", ".h5"):
        try:
            import h5py
        except ImportError as e:
            raise ImportError(
                f"Reading {path} needs h5py (`pip install h5py`), or convert it "
                "to an .npz with the same array names."
            ) from e
        with h5py.File(path, "r") as f:
            raw = {k: np.asarray(f[k]) for k in D4RL_KEYS if k in f}
    else:
        with np.load(path, allow_pickle=False) as f:
            raw = {k: np.asarray(f[k]) for k in (*D4RL_KEYS, *_EXTRA_KEYS) if k in f}
    missing = [k for k in D4RL_KEYS[:4] if k not in raw]
    if missing:
        raise ValueError(
            f"{path} is not a D4RL dataset: it lacks {missing} (need "
            f"{list(D4RL_KEYS)})."
        )
    raw.setdefault("timeouts", np.zeros(len(raw["rewards"]), bool))
    return raw


def episode_bounds(terminals: np.ndarray, timeouts: np.ndarray) -> np.ndarray:
    """int64[E, 2] `(start, end)` of each episode: an episode ends after a
    step with `terminals | timeouts` (and at the end of the arrays)."""
    done = np.flatnonzero(np.asarray(terminals, bool) | np.asarray(timeouts, bool))
    ends = done + 1
    n = len(terminals)
    if not len(ends) or ends[-1] != n:
        ends = np.append(ends, n)
    starts = np.concatenate([[0], ends[:-1]])
    return np.stack([starts, ends], axis=1).astype(np.int64)


def returns_to_go(rewards: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """R_t = sum of the rewards from step t to its episode's end: f32[N]."""
    out = np.zeros(len(rewards), np.float64)
    for start, end in bounds:
        out[start:end] = np.cumsum(rewards[start:end][::-1].astype(np.float64))[::-1]
    return out.astype(np.float32)


def split_episodes(
    bounds: np.ndarray,
    groups: np.ndarray | None = None,
    test_fraction: float = TEST_FRACTION,
    seed: int = SPLIT_SEED,
) -> dict[str, np.ndarray]:
    """Episode indices of "train" and "test": within each group (e.g. each
    behaviour policy), a seeded `ceil(test_fraction * n)` episodes (at least
    one when the group has two) are "test"."""
    groups = np.zeros(len(bounds), np.int64) if groups is None else np.asarray(groups)
    rng = np.random.default_rng(seed)
    test = []
    for g in np.unique(groups):
        members = np.flatnonzero(groups == g)
        k = int(np.ceil(test_fraction * len(members))) if len(members) > 1 else 0
        test.extend(rng.permutation(members)[:k].tolist())
    test = np.sort(np.asarray(test, np.int64))
    train = np.setdiff1d(np.arange(len(bounds)), test)
    return {"train": train, "test": test}


class ContextWindows:
    """Random-access source of K-step windows over some episodes.

    `len(source)` = number of steps of the episodes; `source[i]` is the
    window starting at step i (see the module docstring for the fields).

    Attributes:
      state_mean, state_std: f32[state_dim], the normalisation statistics.
      return_scale: returns-to-go are divided by this.
      context_length: K.
      max_episode_steps: timesteps are clipped below this.
      episode_returns: f64[E], the undiscounted return of each episode.
    """

    def __init__(
        self,
        data: Mapping[str, np.ndarray],
        episodes: np.ndarray,
        bounds: np.ndarray,
        *,
        state_mean: np.ndarray,
        state_std: np.ndarray,
        context_length: int = CONTEXT_LENGTH,
        return_scale: float = RETURN_SCALE,
        max_episode_steps: int = MAX_EPISODE_STEPS,
    ):
        if not len(episodes):
            raise ValueError("ContextWindows needs at least one episode; got none.")
        bounds = bounds[np.asarray(episodes)]
        lengths = bounds[:, 1] - bounds[:, 0]
        take = np.concatenate([np.arange(s, e) for s, e in bounds])
        self.state_mean = np.asarray(state_mean, np.float32)
        self.state_std = np.asarray(state_std, np.float32)
        self.context_length = int(context_length)
        self.return_scale = float(return_scale)
        self.max_episode_steps = int(max_episode_steps)
        rewards = np.asarray(data["rewards"], np.float32)
        all_rtg = returns_to_go(rewards, bounds)
        self.episode_returns = np.array(
            [rewards[s:e].astype(np.float64).sum() for s, e in bounds]
        )
        self._states = (
            (np.asarray(data["observations"], np.float32)[take] - self.state_mean)
            / self.state_std
        ).astype(np.float32)
        self._actions = np.asarray(data["actions"], np.float32)[take]
        self._rtg = (all_rtg[take] / self.return_scale).astype(np.float32)
        steps = np.concatenate([np.arange(n) for n in lengths])
        self._timesteps = np.minimum(steps, self.max_episode_steps - 1).astype(np.int32)
        # For each step, how many steps are left in its episode (itself included).
        ends = np.repeat(np.cumsum(lengths), lengths)
        self._left = (ends - np.arange(len(take))).astype(np.int64)

    def __len__(self) -> int:
        return len(self._states)

    def gather(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """Windows starting at `indices`: `{field: array[len(indices), K, ...]}`."""
        k = self.context_length
        idx = np.asarray(indices, np.int64)
        valid_len = np.minimum(self._left[idx], k)  # [B]
        pad = k - valid_len
        pos = np.arange(k)[None, :]
        valid = pos >= pad[:, None]  # [B, K]
        src = np.clip(idx[:, None] + pos - pad[:, None], 0, len(self) - 1)
        fm = valid.astype(np.float32)
        return {
            "states": self._states[src] * fm[..., None],
            "actions": self._actions[src] * fm[..., None],
            "returns_to_go": (self._rtg[src] * fm)[..., None],
            "timesteps": np.where(valid, self._timesteps[src], 0).astype(np.int32),
            "mask": fm,
        }

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"window {index} out of range [0, {len(self)}).")
        return {
            k: v[0] for k, v in self.gather(np.asarray([index % len(self)])).items()
        }

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, np.ndarray]]:
        batch = self.gather(np.asarray(indices))
        return [{k: v[i] for k, v in batch.items()} for i in range(len(indices))]


def make_windows(
    data: Mapping[str, np.ndarray],
    split: str,
    *,
    context_length: int = CONTEXT_LENGTH,
    max_episode_steps: int = MAX_EPISODE_STEPS,
) -> ContextWindows:
    """The `split` ("train"/"test") windows of D4RL-format `data`, normalised
    with the train episodes' state statistics."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test'; got {split!r}.")
    bounds = episode_bounds(data["terminals"], data["timeouts"])
    groups = None
    if "policy" in data:
        groups = np.asarray(data["policy"])[bounds[:, 0]]
    episodes = split_episodes(bounds, groups)
    train_steps = np.concatenate(
        [np.arange(s, e) for s, e in bounds[episodes["train"]]]
    )
    states = np.asarray(data["observations"], np.float64)[train_steps]
    mean, std = states.mean(0), states.std(0) + 1e-6
    return ContextWindows(
        data,
        episodes[split],
        bounds,
        state_mean=mean,
        state_std=std,
        context_length=context_length,
        max_episode_steps=max_episode_steps,
    )


def _find_d4rl(data_dir: str) -> pathlib.Path | None:
    root = pathlib.Path(data_dir).expanduser()
    if root.is_file():
        return root
    for name in D4RL_FILES:
        if (root / name).is_file():
            return root / name
    return None


def load_generated(
    config: Generation | None = None, directory: str | os.PathLike | None = None
) -> dict[str, np.ndarray]:
    """The project's generated data for `config` (default: `preset()`), from
    `directory` (default `cache_dir()`), generated and cached first if absent."""
    config = config or preset()
    path = pathlib.Path(directory or cache_dir()) / generated_file_name(config)
    if not path.exists():
        with cache_lib.preparing(
            "Hopper trajectories (an ARS policy is trained and rolled out; "
            "`python -m velo_scale.data.hopper` does it ahead)",
            "~5 min",
        ):
            generate_hopper_dataset(path, config)
    return read_d4rl(path)


def load_hopper(split: str, data_dir: str | None = None) -> ContextWindows:
    """Hopper context windows (registry name `hopper`).

    Args:
      split: "train" or "test" (a fixed 90/10 split by episode).
      data_dir: None for the project's generated data (made and cached on
        first use; `$VELO_SCALE_HOPPER_PRESET` picks the preset); or a
        directory holding D4RL's `hopper-medium-v2.hdf5`/`.npz` (or a
        generated `hopper-v5-ars-mixed-*.npz` of the current preset), or the
        path of such a file.

    Returns:
      A `ContextWindows` source (see the module docstring).

    Raises:
      FileNotFoundError: `data_dir` holds no such file.
    """
    if data_dir is None:
        return make_windows(load_generated(), split)
    found = _find_d4rl(data_dir)
    if found is None:
        generated = pathlib.Path(data_dir).expanduser() / generated_file_name(preset())
        if generated.exists():
            return make_windows(read_d4rl(generated), split)
        raise FileNotFoundError(
            f"No Hopper dataset in {data_dir} (looked for {', '.join(D4RL_FILES)} "
            f"and {generated.name}). For the full-scale recipe, download D4RL's "
            "hopper-medium-v2.hdf5 (the `d4rl` package, or the Decision "
            "Transformer repo's gym/data/download_d4rl_datasets.py) into it; "
            "h5py reads it (or save its observations/actions/rewards/terminals/"
            "timeouts arrays as hopper-medium-v2.npz). Or generate the project's "
            "data there with `python -m velo_scale.data.hopper --out "
            f"{data_dir}`, or leave train.data_dir unset to use the cache."
        )
    return make_windows(read_d4rl(found), split)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m velo_scale.data.hopper [--out DIR] [--preset full|tiny]`:
    generates the project's Hopper data (into DIR or the cache)."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--out", default=None, help="directory (default: cache)")
    parser.add_argument("--preset", default=None, choices=sorted(PRESETS))
    args = parser.parse_args(argv)
    config = PRESETS[args.preset] if args.preset else preset()
    path = pathlib.Path(args.out or cache_dir()) / generated_file_name(config)
    if path.exists():
        print(f"{path} exists.")
    else:
        generate_hopper_dataset(path, config)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
