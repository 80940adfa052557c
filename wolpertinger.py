r"""Wolpertinger: DDPG in a large discrete action space, with a k-nearest-neighbour lookup and critic refinement.

Every discrete action has an embedding, a point in a continuous box [-1, 1]^D. A DDPG actor outputs a
proto-action in that box (plus Gaussian exploration noise while training); the k actions whose embeddings
are nearest to it are looked up; the critic Q(s, embedding) picks the best of those k, and that action is
taken. Training is DDPG on the embeddings of the actions taken: a TD target through the target actor,
the deterministic policy gradient for the actor, soft target updates.

Paper: Dulac-Arnold et al., "Deep Reinforcement Learning in Large Discrete Action Spaces", 2015 (arXiv
1512.07679). Action sets: a continuous Gymnasium or DeepMind Control task discretised into a grid of about
--max-actions actions (round(max_actions ** (1 / D)) evenly spaced bins per dimension, at least 2; the grid
points are the embeddings), or a native Discrete task, whose n actions get the embeddings linspace(-1, 1, n)
in one dimension (an arbitrary order; with --k n the critic sees every action and the order cannot matter).
Headline (the community releases' setting, Pendulum with 200,000 actions and k = 10% of them):

    python wolpertinger.py --env-id Pendulum-v1 --max-actions 200000
    python wolpertinger.py --env-id CartPole-v1 --total-timesteps 100000 --k 2 --knn-in-target \
        --epsilon 0.1 --end-epsilon 0.01

CartPole has 2 actions, so 10% of them is 1 neighbour and the critic would have nothing to choose from; with
--k 2 it chooses between both (Gaussian noise on the proto-action then no longer changes the action, so
exploration comes from --epsilon: a uniform pick among the k neighbours, decayed so that late training
episodes are nearly greedy), and --knn-in-target makes the target the target critic's best of both actions
rather than its value at the target actor's in-between point.
"""

import contextlib
import csv
import ctypes.util
import functools
import io
import itertools
import json
import math
import os
import re

# Offscreen rendering (only --capture-video renders) through EGL where its library is installed, else none:
# dm_control loads the renderer MUJOCO_GL names when it is imported, and fails there if the library is missing.
MUJOCO_GL_GIVEN = "MUJOCO_GL" in os.environ
os.environ.setdefault("MUJOCO_GL", "egl" if ctypes.util.find_library("EGL") else "disable")
os.environ.setdefault("SDL_VIDEODRIVER", "dummy")  # classic-control tasks render through pygame: no window
import signal
import sys
import time
import traceback
import warnings
from dataclasses import dataclass
from typing import Any, NamedTuple, Optional, get_args, get_type_hints

import flax.linen as nn
import gymnasium as gym
import jax
import jax.numpy as jnp
import numpy as np
import optax
try:
    import shimmy  # noqa: F401  (importing it registers the dm_control/* Gymnasium ids)
except ModuleNotFoundError:
    raise
except Exception as import_error:  # a renderer this machine cannot start (libEGL without a usable EGL device)
    raise SystemExit(f"error: dm_control cannot be imported with MUJOCO_GL={os.environ['MUJOCO_GL']!r}"
                     f"{'' if MUJOCO_GL_GIVEN else ' (chosen because libEGL is installed)'}: "
                     f"{type(import_error).__name__}: {str(import_error).rstrip('.')}; "
                     "MUJOCO_GL=disable runs without a renderer (no --capture-video)")
import tyro
from flax.training.train_state import TrainState

# DeepMind Control declares float64 boxes; casting them to our float32 observations is intended.
warnings.filterwarnings("ignore", message=".*precision lowered by casting to float32")


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment (part of the run name)"""
    seed: int = 1
    """seed of the experiment: environment, exploration and network initialisation"""
    track: bool = False
    """log the run to Weights & Biases"""
    wandb_project_name: str = "qmle-jax"
    """the Weights & Biases project"""
    wandb_entity: Optional[str] = None
    """the Weights & Biases entity (team)"""
    capture_video: bool = False
    """record videos of the evaluation episodes to runs/{run_name}/videos (renders offscreen: EGL, or the
    renderer MUJOCO_GL names; needs moviepy)"""
    save_model: bool = False
    """save the parameters, with the settings that give them meaning, to runs/{run_name}/{exp_name}.npz at the end
    (before the final evaluation; a run that stops early saves them too)"""
    load_model: Optional[str] = None
    """path of a saved model: evaluate it greedily for --eval-episodes episodes instead of training, on its own
    run's task and settings"""

    env_id: str = "Pendulum-v1"
    """Gymnasium id (Box actions are discretised, Discrete ones used as they are) or DeepMind Control `domain-task`"""
    total_timesteps: int = 50_000
    """environment steps to train for"""
    learning_rate: float = 3e-4
    """Adam step size of the actor and of the critic (CleanRL DDPG)"""
    buffer_size: int = 1_000_000
    """replay memory capacity in transitions"""
    gamma: float = 0.99
    """discount factor"""
    tau: float = 0.005
    """soft target update rate: target <- tau * online + (1 - tau) * target"""
    batch_size: int = 256
    """transitions per update"""
    learning_starts: int = 5000
    """environment steps of uniformly random actions before the first update"""
    train_frequency: int = 1
    """environment steps between updates (DDPG: every step)"""
    policy_frequency: int = 2
    """updates between actor updates (and soft target updates), as in CleanRL's DDPG"""
    exploration_noise: float = 0.1
    """std of the Gaussian noise added to the proto-action while training (the embedding box is [-1, 1])"""
    epsilon: float = 0.0
    """probability of taking a uniformly random one of the k neighbours instead of the critic's pick (the
    exploration that survives refinement when k covers every action, as with --k 2 on CartPole); it falls
    linearly to --end-epsilon over the first --exploration-fraction of the run, as in CleanRL's DQN"""
    end_epsilon: float = 0.0
    """the final value of --epsilon"""
    exploration_fraction: float = 0.5
    """the fraction of --total-timesteps over which --epsilon falls to --end-epsilon"""
    prioritized_replay: bool = False
    """proportional prioritised replay; off by default because DDPG's actor gradient is an average over the
    visited states, which priorities by critic error would skew, and uniform replay is the DDPG norm"""
    priority_exponent: float = 0.6
    """alpha: how strongly priorities skew sampling"""
    importance_exponent: float = 0.2
    """beta: strength of the importance-sampling correction"""
    priority_epsilon: float = 1e-6
    """added to abs TD error so no transition gets zero priority"""

    max_actions: int = 200_000
    """size of the grid a Box action space is discretised into: round(max_actions ** (1/D)) bins per dimension
    (at least 2), so bins ** D actions; a grid over 1 GiB is refused at start-up with the largest that fits (and
    tasks with so many action dimensions that even 2 bins do not fit, such as dog-walk's 38, with what to use
    instead); ignored for Discrete action spaces"""
    k_ratio: float = 0.1
    """k as a fraction of the number of actions (rounded, at least 1); the community releases use 0.1"""
    k: Optional[int] = None
    """number of nearest neighbours the critic chooses among; overrides --k-ratio"""
    knn: str = "exact"
    """k-NN search: `exact` (distances to all N embeddings, then jax.lax.top_k: O(N*D) per query) or `approx`
    (jax.lax.approx_max_k: a partial reduction keeping about --recall-target of them on TPU, exact elsewhere)"""
    recall_target: float = 0.95
    """expected recall of --knn approx"""
    knn_in_target: bool = False
    """as in the paper, refine the target too: the target action is the target critic's best among the k
    nearest to the target actor's proto-action (costs batch_size * k critic evaluations per update, not
    batch_size); off, the target is DDPG's Q'(s', mu'(s')) at the proto-action itself"""

    num_envs: int = 1
    """environments stepped together, one process each when > 1; the update-to-data ratio stays one update per
    --train-frequency environment steps counted over all of them (the paper: 1)"""
    checkpoint_frequency: int = 0
    """environment steps between checkpoints of the whole run to runs/{run_name}/checkpoint/, which is written
    when the run ends or stops early too (0 = off)"""
    resume: Optional[str] = None
    """runs/{run_name} of a checkpointed run: continue it there, with its own settings (--total-timesteps, the
    checkpoint, evaluation and logging flags may change)"""
    xla_cache: str = "~/.cache/qmle-jax/xla"
    """persistent XLA compilation cache, so that a second run of the same configuration starts at once ('' = off)"""
    eval_frequency: int = 10_000
    """environment steps between greedy evaluations (0 = never)"""
    eval_episodes: int = 1
    """episodes per greedy evaluation"""
    log_frequency: int = 1000
    """environment steps between console and metrics lines"""


def check_args(args: Args) -> None:
    """Reject settings that would crash later or silently train something else."""
    for name, value in vars(args).items():
        if isinstance(value, float) and not math.isfinite(value):
            fail(f"--{flag(name)} must be a finite number, got {value}")
    at_least = dict(total_timesteps=1, batch_size=1, train_frequency=1, policy_frequency=1, num_envs=1,
                    max_actions=1, eval_episodes=1, log_frequency=1)
    at_least_zero = dict(learning_starts=0, eval_frequency=0, checkpoint_frequency=0, exploration_noise=0.0,
                         priority_exponent=0.0, importance_exponent=0.0)
    for name, low in {**at_least, **at_least_zero}.items():
        if getattr(args, name) < low:
            fail(f"--{flag(name)} must be >= {low}, got {getattr(args, name)}")
    for name in ("gamma", "tau", "epsilon", "end_epsilon", "exploration_fraction", "recall_target"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            fail(f"--{flag(name)} must be in [0, 1], got {getattr(args, name)}")
    if not 0.0 < args.k_ratio <= 1.0:
        fail(f"--k-ratio must be in (0, 1], got {args.k_ratio}")
    if args.k is not None and args.k < 1:
        fail(f"--k must be >= 1, got {args.k}")
    if args.knn not in ("exact", "approx"):
        fail(f"--knn must be exact or approx, got {args.knn!r}")
    if args.learning_rate <= 0:
        fail(f"--learning-rate must be > 0, got {args.learning_rate}")
    if args.prioritized_replay and args.priority_epsilon <= 0:
        fail(f"--priority-epsilon must be > 0 with prioritised replay, got {args.priority_epsilon}")
    if args.buffer_size < math.lcm(args.num_envs, args.train_frequency):
        fail(f"--buffer-size must hold the {math.lcm(args.num_envs, args.train_frequency)} transitions written per "
             f"update (lcm of --num-envs and --train-frequency), got {args.buffer_size}")
    if args.gamma == 1.0:
        print(f"warning: --gamma 1 does not discount: on {args.env_id}, Q grows without bound unless every episode "
              "ends in a terminal state (a time limit is not one)", file=sys.stderr)
    if args.load_model is not None and not os.path.isfile(args.load_model):
        fail(f"--load-model: no such file: {args.load_model}")


def flag(name: str) -> str:
    return name.replace("_", "-")


def fail(message: str) -> None:
    raise SystemExit(f"error: {message}")


SCRIPT = os.path.basename(__file__)
# What a saved model's shapes and meaning depend on, besides the script: the task (observation and action spaces),
# the grid its actions index, and k, because the greedy policy is the critic's best of the k nearest actions, so
# another k (--k or --k-ratio) would evaluate another policy than the run trained and evaluated.
MODEL_SETTINGS = ("env_id", "max_actions", "k", "k_ratio")
RESUME_MAY_CHANGE = ("total_timesteps", "checkpoint_frequency", "resume", "xla_cache", "track", "wandb_project_name",
                     "wandb_entity", "capture_video", "save_model", "eval_frequency", "eval_episodes", "log_frequency")


def dmc_gym_id(env_id: str) -> Optional[str]:
    """`walker-walk` -> `dm_control/walker-walk-v0` when it names a suite task, else None."""
    from dm_control import suite

    return f"dm_control/{env_id}-v0" if tuple(env_id.split("-", 1)) in suite.ALL_TASKS else None


def make_env(env_id: str, seed: int, render: bool = False) -> gym.Env:
    """A Gymnasium env with float32 flat observations; Box actions rescaled to [-1, 1], Discrete ones as is."""
    gym_id = dmc_gym_id(env_id) or env_id
    if gym_id not in gym.registry:
        from dm_control import suite

        dmc = ", ".join(f"{d}-{t}" for d, t in suite.ALL_TASKS)
        fail(f"unknown --env-id {env_id!r}; DeepMind Control ids: {dmc}; or any Gymnasium id with Box or "
             "Discrete actions")
    try:  # a registered id can still fail to build: a missing extra (Box2D), an id moved to another package
        env = gym.make(gym_id, render_mode="rgb_array" if render else None)
    except Exception as error:
        reason = (str(error).strip().splitlines() or [""])[0]
        fail(f"--env-id {env_id!r} is registered but cannot be made: {type(error).__name__}: {reason}")
    box = isinstance(env.action_space, gym.spaces.Box)
    if not (box and len(env.action_space.shape) == 1 or isinstance(env.action_space, gym.spaces.Discrete)):
        fail(f"--env-id {env_id!r} has {env.action_space} actions; {SCRIPT} needs a one-dimensional Box or a Discrete")
    observations = env.observation_space
    try:
        env = gym.wrappers.FlattenObservation(env)
        flat = isinstance(env.observation_space, gym.spaces.Box) and len(env.observation_space.shape) == 1
    except Exception:
        flat = False
    if not flat:
        fail(f"--env-id {env_id!r} has {observations} observations, which do not flatten to a vector")
    env = gym.wrappers.DtypeObservation(env, np.float32)
    if box:
        env = gym.wrappers.RescaleAction(env, -1.0, 1.0)  # the grid lives in [-1, 1]^D; the env sees its bounds
    env = gym.wrappers.RecordEpisodeStatistics(env)
    env.action_space.seed(seed)
    return env


def make_envs(env_id: str, seed: int, num_envs: int) -> gym.vector.VectorEnv:
    """make_env(env_id, seed + i) for i < num_envs, in this process for one, one process each for more. Same-step
    autoreset: an episode's last observation comes in infos["final_obs"], the next one's first in its place."""
    fns = [functools.partial(make_worker_env if num_envs > 1 else make_env, env_id, seed + i) for i in range(num_envs)]
    # Workers are forked before this process has started JAX (main builds them first), so no JAX thread is
    # copied into them; they only ever step their environment.
    vector = gym.vector.AsyncVectorEnv if num_envs > 1 else gym.vector.SyncVectorEnv
    return vector(fns, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)


def make_worker_env(env_id: str, seed: int) -> gym.Env:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group; the trainer decides
    return make_env(env_id, seed)


# The most memory the action grid may take at once, in bytes: its table [N, D] float32 (numpy keeps it for the
# environment's actions, the device holds a copy), or, per device call, the exact k-NN's distances [S, N] with the
# critic's two hidden layers over the k neighbours [S, k, 256], for the S states searched at once. 1 GiB leaves room
# for both copies, the replay buffer and XLA on a small machine, and is far past useful sizes already: every step
# reads the whole table (Pendulum-v1 at 1,000,000 actions: 10 steps/s). A grid over it is refused before it is built.
GRID_BYTES_CAP = 1 << 30
# Grids that build but train slowly: more neighbours than the Pendulum headline's k = 20,000 (at the default
# --k-ratio the critic over them is most of a step), or a table of ten times its 200,000 entries (N x D). Start-up
# warns with the measured cost (docs/wolpertinger.md, "Which tasks").
SLOW_K, SLOW_TABLE = 20_000, 2_000_000
KNN_TARGET_ROWS = 65536  # --knn-in-target searches max(1, this // k) states at a time: about this many critic rows


def grid_bins(max_actions: int, dim: int) -> int:
    """Bins per dimension of the grid --max-actions asks for: round(max_actions ** (1 / D))."""
    return int(round(max_actions ** (1.0 / dim)))


def grid_bytes(num_actions: int, dim: int, args: "Args") -> int:
    """The most memory a grid of `num_actions` D-dimensional actions takes at once in this run (GRID_BYTES_CAP)."""
    k = min(neighbour_count(args, num_actions), num_actions)  # a --k over the number of actions is refused later
    states = max(args.num_envs, min(args.batch_size, max(1, KNN_TARGET_ROWS // k)) if args.knn_in_target else 1)
    return 4 * max(num_actions * dim, states * (num_actions + 2 * 256 * k))


def size_text(n: int) -> str:
    value, unit = (n / 2 ** 40, "TiB") if n >= 2 ** 40 else (n / 2 ** 30, "GiB")
    return f"{value:,.1f}".removesuffix(".0") + f" {unit}"


def action_table(space: gym.spaces.Space, max_actions: int, args: Optional["Args"] = None) -> np.ndarray:
    """The embeddings of all discrete actions, [N, D] float32 in [-1, 1]; row i is action i.

    Box (already rescaled to [-1, 1]^D): the grid of `bins` evenly spaced values per dimension, bins =
    round(max_actions ** (1/D)), rows in C order (the last dimension varies fastest), so action i has the
    per-dimension bin indices np.unravel_index(i, (bins,) * D). Discrete(n): linspace(-1, 1, n) as [n, 1].
    A grid over GRID_BYTES_CAP at `args`' k and --num-envs (default: Args()) is refused before it is built,
    with the largest --max-actions that fits, or, when not even 2 bins per dimension fit, what to use instead.
    """
    if isinstance(space, gym.spaces.Discrete):
        return np.linspace(-1.0, 1.0, int(space.n), dtype=np.float32)[:, None]
    args = args or Args()
    dim = int(np.prod(space.shape))
    cap = size_text(GRID_BYTES_CAP)
    if 2 ** dim * dim * 4 > GRID_BYTES_CAP:
        fail(f"{dim} action dimensions are too many to enumerate: even 2 bins per dimension make 2**{dim} = "
             f"{2 ** dim:,} actions, a {size_text(2 ** dim * dim * 4)} table ({SCRIPT} builds at most {cap}); use "
             "qmle_dmc.py or aql_discrete.py, which sample candidate actions instead of enumerating them")
    fits = lambda bins: grid_bytes(bins ** dim, dim, args) <= GRID_BYTES_CAP  # noqa: E731
    if not fits(2):
        fail(f"even 2 bins per dimension ({2 ** dim:,} actions, k = {neighbour_count(args, 2 ** dim):,}) need "
             f"{size_text(grid_bytes(2 ** dim, dim, args))} for the k-NN and the critic over the k neighbours, over "
             f"the {cap} cap; use a smaller --k or --k-ratio")
    bins = grid_bins(max_actions, dim)
    if bins < 2:
        fail(f"--max-actions {max_actions} gives fewer than 2 bins per dimension for {dim} action dimensions; "
             f"use at least --max-actions {2 ** dim}")
    if not fits(bins):
        low, high = 2, bins  # the largest bins that fit: fits(low), not fits(high)
        while high - low > 1:
            low, high = ((low + high) // 2, high) if fits((low + high) // 2) else (low, (low + high) // 2)
        while low > 2 and grid_bins(low ** dim, dim) != low:  # float roots: suggest a size that gives `low` bins
            low -= 1
        hint = (f"use at most --max-actions {low ** dim}" if args.k is None or args.k <= low ** dim
                else "use a smaller --k")
        grid = f"{bins} bins in each of {dim} dimensions" if dim > 1 else f"{bins} bins in 1 dimension"
        fail(f"--max-actions {max_actions} makes {bins ** dim:,} actions ({grid}), "
             f"k = {neighbour_count(args, bins ** dim):,}, which need {size_text(grid_bytes(bins ** dim, dim, args))} "
             f"at once (the table, or the k-NN's distances and the critic over the k neighbours), over the {cap} "
             f"cap; {hint}")
    values = np.linspace(-1.0, 1.0, bins, dtype=np.float32)
    # copy=False: broadcast views, so that only the stacked table is allocated
    return np.stack(np.meshgrid(*[values] * dim, indexing="ij", copy=False), -1).reshape(-1, dim)


def env_action(space: gym.spaces.Space, table: np.ndarray, index):
    """What the environment is given for action indices (an int, or [N] for N environments): the indices themselves
    (Discrete), or their grid points ([D], or [N, D])."""
    return np.asarray(index) if isinstance(space, gym.spaces.Discrete) else table[index]


# === replay buffer: begin (identical in every agent script) ===
class ReplayBuffer(NamedTuple):
    """Device-resident replay memory, a pytree that jitted code reads and writes.

    `storage` is the transition pytree with a leading capacity axis. `tree` is a sum-tree of sampling
    weights (priority ** alpha) laid out heap-style: slot 1 is the root (the total), slot i has children
    2i and 2i + 1, and leaf j sits in slot `leaves + j`. Parents are always recomputed from their
    children, so float32 rounding never accumulates however long the run.
    """

    storage: Any
    tree: jax.Array
    max_weight: jax.Array  # the weight new transitions get: the largest seen, so each is replayed soon
    cursor: jax.Array
    size: jax.Array


def buffer_init(example_transition: Any, capacity: int) -> ReplayBuffer:
    leaves = 1 << max(capacity - 1, 1).bit_length()
    storage = jax.tree.map(lambda x: jnp.zeros((capacity, *jnp.shape(x)), jnp.asarray(x).dtype), example_transition)
    return ReplayBuffer(storage, jnp.zeros(2 * leaves, jnp.float32), jnp.ones((), jnp.float32),
                        cursor=jnp.zeros((), jnp.int32), size=jnp.zeros((), jnp.int32))


def _tree_set(tree: jax.Array, index: jax.Array, weight: jax.Array) -> jax.Array:
    leaves = tree.shape[0] // 2
    node = index + leaves
    tree = tree.at[node].set(weight)
    for _ in range(leaves.bit_length() - 1):
        node = node // 2
        tree = tree.at[node].set(tree[2 * node] + tree[2 * node + 1])
    return tree


def buffer_add(buffer: ReplayBuffer, transitions: Any) -> ReplayBuffer:
    """Write a chunk of transitions (leading axis n) at the cursor, overwriting the oldest when full."""
    capacity = jax.tree.leaves(buffer.storage)[0].shape[0]
    n = jax.tree.leaves(transitions)[0].shape[0]
    index = (buffer.cursor + jnp.arange(n)) % capacity
    storage = jax.tree.map(lambda s, x: s.at[index].set(x), buffer.storage, transitions)
    tree = _tree_set(buffer.tree, index, jnp.full(n, buffer.max_weight))
    return buffer._replace(storage=storage, tree=tree, cursor=(buffer.cursor + n) % capacity,
                           size=jnp.minimum(buffer.size + n, capacity))


def buffer_sample(buffer: ReplayBuffer, key: jax.Array, batch_size: int, prioritized: bool, beta: float,
                  stratified: bool = True):
    """Returns (indices, transitions, importance weights normalised to max 1 within the batch).

    Proportional sampling is stratified by default: one draw from each of `batch_size` equal slices of the
    total, which spreads a batch over the buffer; stratified=False draws each point from the whole total
    (Stable-Baselines, as the QMLE release does).
    """
    if not prioritized:
        index = jax.random.randint(key, (batch_size,), 0, buffer.size)
        return index, jax.tree.map(lambda s: s[index], buffer.storage), jnp.ones(batch_size, jnp.float32)
    leaves = buffer.tree.shape[0] // 2
    total = buffer.tree[1]
    uniform = jax.random.uniform(key, (batch_size,))
    target = (jnp.arange(batch_size) + uniform) * (total / batch_size) if stratified else uniform * total
    node = jnp.ones(batch_size, jnp.int32)
    for _ in range(leaves.bit_length() - 1):
        left = buffer.tree[2 * node]
        go_right = target >= left
        target = jnp.where(go_right, target - left, target)
        node = 2 * node + go_right
    index = jnp.minimum(node - leaves, buffer.size - 1)  # float rounding can step past the last leaf
    probability = buffer.tree[index + leaves] / total
    weights = (buffer.size * probability) ** -beta
    return index, jax.tree.map(lambda s: s[index], buffer.storage), weights / weights.max()


def buffer_update(buffer: ReplayBuffer, index: jax.Array, priority: Optional[jax.Array] = None,
                  alpha: float = 1.0, **fields: jax.Array) -> ReplayBuffer:
    """Write back new priorities (raised to alpha here) and/or new values of stored fields at `index`."""
    storage = dict(buffer.storage, **{k: buffer.storage[k].at[index].set(v) for k, v in fields.items()})
    if priority is None:
        return buffer._replace(storage=storage)
    weight = priority.astype(jnp.float32) ** alpha
    return buffer._replace(storage=storage, tree=_tree_set(buffer.tree, index, weight),
                           max_weight=jnp.maximum(buffer.max_weight, weight.max()))
# === replay buffer: end ===


class Actor(nn.Module):
    """mu(s): the proto-action, a point of the embedding box [-1, 1]^D (CleanRL DDPG's 256-256 MLP)."""

    embedding_dim: int

    @nn.compact
    def __call__(self, obs):
        x = nn.relu(nn.Dense(256)(obs))
        x = nn.relu(nn.Dense(256)(x))
        return nn.tanh(nn.Dense(self.embedding_dim)(x))


class Critic(nn.Module):
    """Q(s, e) for action embeddings e: obs [..., O], embeddings [..., M, D] -> [..., M].

    CleanRL DDPG's 256-256 MLP on concat(s, e), with the first layer split into its observation and action
    halves (the same linear map): the observation half is computed once per state, not once per neighbour.
    """

    @nn.compact
    def __call__(self, obs, embeddings):
        h = nn.Dense(256, name="obs_in")(obs)[..., None, :] + nn.Dense(256, use_bias=False, name="act_in")(embeddings)
        h = nn.relu(nn.Dense(256, name="hidden")(nn.relu(h)))
        return nn.Dense(1, name="out")(h)[..., 0]


@functools.partial(jax.jit, static_argnames=("k", "approx", "recall_target"))
def nearest_actions(table, queries, k: int, approx: bool = False, recall_target: float = 0.95):
    """Indices [B, k] of the k rows of `table` [N, D] nearest (Euclidean) to each of `queries` [B, D].

    Exact: all N squared distances per query (O(N * D) work, O(B * N) memory), then the k largest negative
    distances with jax.lax.top_k, nearest first. Approximate: jax.lax.approx_max_k on the same scores, which
    XLA optimises on TPU only (a binned partial reduction keeping about `recall_target` of the true
    neighbours); elsewhere it falls back to an exact search. Differences, not |q|^2 - 2 q.t + |t|^2, so that
    close neighbours on a fine grid keep their order.
    """
    scores = -jnp.sum((queries[:, None, :] - table[None]) ** 2, axis=-1)
    if approx:
        return jax.lax.approx_max_k(scores, k, recall_target=recall_target)[1]
    return jax.lax.top_k(scores, k)[1]


def refine(critic: Critic, critic_params, table, obs, proto, k: int, approx: bool, recall_target: float):
    """Wolpertinger's policy for one state: obs [O], proto-action [D] -> (k neighbours [k], their Q [k])."""
    neighbours = nearest_actions(table, proto[None], k, approx, recall_target)[0]
    return neighbours, critic.apply(critic_params, obs, table[neighbours])


class Networks(NamedTuple):
    """The two flax modules (static under jit) and their k-NN settings."""

    actor: Actor
    critic: Critic
    k: int
    approx: bool = False
    recall_target: float = 0.95


@functools.partial(jax.jit, static_argnames=("nets",))
def select_action(nets: Networks, params, table, obs, key, noise_std, epsilon):
    """Act in N states: proto-actions + N(0, noise_std), the k nearest actions of each, the critic's best of them
    (or, with prob. epsilon, a uniform one of them): obs [N, O] -> (chosen action indices [N], indices of the
    actions nearest to the noisy proto-actions [N])."""
    k_noise, k_explore, k_random = jax.random.split(key, 3)
    proto = nets.actor.apply(params["actor"], obs)
    proto = jnp.clip(proto + noise_std * jax.random.normal(k_noise, proto.shape), -1.0, 1.0)
    explore = jax.random.uniform(k_explore, proto.shape[:1]) < epsilon
    random_pick = jax.random.randint(k_random, proto.shape[:1], 0, nets.k)

    def choose(obs, proto, explore, random_pick):  # one state
        neighbours, q = refine(nets.critic, params["critic"], table, obs, proto, nets.k, nets.approx,
                               nets.recall_target)
        # The nearest is found from the distances, not assumed to be first: approx_max_k need not sort.
        nearest = neighbours[jnp.argmin(jnp.sum((table[neighbours] - proto) ** 2, axis=-1))]
        return jnp.where(explore, neighbours[random_pick], neighbours[q.argmax()]), nearest

    return jax.vmap(choose)(obs, proto, explore, random_pick)


@functools.partial(jax.jit, static_argnames=("nets",), donate_argnames=("counts",))
def act(nets: Networks, params, table, obs, key, counts, noise_std, epsilon):
    """The training loop's one device call per step: the action indices for all N environments, the next loop
    key and the update's key, and counted on the device (read at log steps only) how often the critic's pick
    differs from the action nearest the noisy proto-action, and out of how many: counts [changed, steps]."""
    key, k_act, k_update = jax.random.split(key, 3)
    index, nearest = select_action(nets, params, table, obs, k_act, noise_std, epsilon)
    return index, key, k_update, counts + jnp.array([jnp.sum(index != nearest), index.shape[0]], counts.dtype)


@jax.jit
def advance_key(key, steps):
    """The loop key after `steps` more steps, split as act splits it, and the last one's update key: the random
    steps before learning starts make no device call and catch up here, so the keys do not depend on them."""
    def split(_, keys):
        key, _, k_update = jax.random.split(keys[0], 3)
        return key, k_update

    return jax.lax.fori_loop(0, steps, split, (key, key))


class DDPGState(TrainState):  # apply_fn unused (None): the networks are passed to each jitted function instead
    target_params: Any


@functools.cache
def adam(learning_rate: float) -> optax.GradientTransformation:
    """One optimizer object per learning rate. It sits in the train state's static part, so a second main() in one
    process (the tests run many) finds the update already compiled instead of compiling it again."""
    return optax.adam(learning_rate)


def target_value(nets: Networks, actor_state: DDPGState, critic_state: DDPGState, table, next_obs,
                 knn_in_target: bool):
    """The value the TD target bootstraps from, [B].

    DDPG: Q'(s', mu'(s')), the target critic at the target actor's proto-action. With knn_in_target
    (the paper's): the target critic's best among the k actions nearest to mu'(s'), which costs B * k critic
    evaluations; they run a few states at a time so the [states, k, 256] activations stay around 64k rows.
    """
    next_proto = nets.actor.apply(actor_state.target_params, next_obs)
    if not knn_in_target:
        return nets.critic.apply(critic_state.target_params, next_obs, next_proto[:, None])[:, 0]
    best_q = lambda xs: refine(nets.critic, critic_state.target_params, table, *xs, nets.k, nets.approx,  # noqa: E731
                               nets.recall_target)[1].max()
    return jax.lax.map(best_q, (next_obs, next_proto), batch_size=max(1, KNN_TARGET_ROWS // nets.k))


def gradient_step(nets: Networks, actor_state: DDPGState, critic_state: DDPGState, buffer: ReplayBuffer, table, key,
                  *, update_actor, gamma: float, tau: float, batch_size: int, prioritized: bool, alpha: float,
                  beta: float, priority_epsilon: float, knn_in_target: bool = False):
    """One DDPG update: sample, compute the TD target, step the critic, write priorities back, and (when
    update_actor) step the actor by the deterministic policy gradient through the updated critic and soft-update
    both targets. update_actor is a Python bool (the off-steps compile without the actor) or, for the updates
    scanned in one call, a traced one (the actor's loss is then NaN on the off-steps).
    """
    index, batch, weights = buffer_sample(buffer, key, batch_size, prioritized, beta)
    next_q = target_value(nets, actor_state, critic_state, table, batch["next_obs"], knn_in_target)
    td_target = batch["reward"] + gamma * (1.0 - batch["terminated"]) * next_q

    def critic_loss(params):
        q = nets.critic.apply(params, batch["obs"], batch["action"][:, None])[:, 0]
        td_error = td_target - q
        return jnp.mean(weights * td_error**2), (td_error, q)

    (qf_loss, (td_error, q)), grads = jax.value_and_grad(critic_loss, has_aux=True)(critic_state.params)
    critic_state = critic_state.apply_gradients(grads=grads)
    buffer = buffer_update(buffer, index, jnp.abs(td_error) + priority_epsilon if prioritized else None, alpha)
    metrics = {"losses/qf_loss": qf_loss, "losses/qf_values": q.mean()}

    def actor_step(states):
        actor_state, critic_state = states

        def actor_loss(params):  # a plain average over the replayed states: no importance weights here
            proto = nets.actor.apply(params, batch["obs"])
            return -nets.critic.apply(critic_state.params, batch["obs"], proto[:, None]).mean()

        loss, grads = jax.value_and_grad(actor_loss)(actor_state.params)
        actor_state = actor_state.apply_gradients(grads=grads)
        soft = lambda s: s.replace(target_params=optax.incremental_update(s.params, s.target_params, tau))  # noqa: E731
        return (soft(actor_state), soft(critic_state)), loss

    if isinstance(update_actor, bool):
        if update_actor:
            (actor_state, critic_state), metrics["losses/actor_loss"] = actor_step((actor_state, critic_state))
    else:
        (actor_state, critic_state), metrics["losses/actor_loss"] = jax.lax.cond(
            update_actor, actor_step, lambda states: (states, jnp.float32(jnp.nan)), (actor_state, critic_state))
    return actor_state, critic_state, buffer, metrics


@functools.partial(jax.jit, donate_argnames=("buffer",), static_argnames=(
    "nets", "updates", "policy_frequency", "phase", "batch_size", "prioritized", "alpha", "beta", "priority_epsilon",
    "knn_in_target"))
def update(nets: Networks, actor_state: DDPGState, critic_state: DDPGState, buffer: ReplayBuffer, new_transitions,
           table, key, *, updates: int = 1, policy_frequency: int = 1, phase: int = 0, **settings):
    """One device call per replay period: store the transitions gathered since the last call, then take
    `updates` gradient steps (one per --train-frequency environment steps they span). The i-th of them steps the
    actor and the targets when (phase + i) % policy_frequency == 0, phase being the number of updates the run has
    taken so far, modulo policy_frequency (static, so at most policy_frequency variants compile).
    """
    buffer = buffer_add(buffer, new_transitions)
    actor_steps = [(phase + i) % policy_frequency == 0 for i in range(updates)]
    if updates == 1:  # the key itself: one environment reproduces the single-environment runs exactly
        return gradient_step(nets, actor_state, critic_state, buffer, table, key, update_actor=actor_steps[0],
                             **settings)

    def step(carry, xs):
        *carry, metrics = gradient_step(nets, *carry, table, xs[0], update_actor=xs[1], **settings)
        return tuple(carry), metrics

    (actor_state, critic_state, buffer), metrics = jax.lax.scan(
        step, (actor_state, critic_state, buffer), (jax.random.split(key, updates), jnp.array(actor_steps)))
    last = {name: m[-1] for name, m in metrics.items() if name != "losses/actor_loss"}
    if any(actor_steps):  # the actor's loss at its last step; none without one, as with a single update
        last["losses/actor_loss"] = metrics["losses/actor_loss"][max(i for i, on in enumerate(actor_steps) if on)]
    return actor_state, critic_state, buffer, last


def evaluate(nets: Networks, params, table, env_id: str, seed: int, episodes: int,
             video_dir: Optional[str] = None) -> list:
    """Greedy returns (no noise, no epsilon: the critic's best of the k nearest) of `episodes` episodes on a fresh
    environment reset with seed, seed + 1, ... Training evaluates with --seed + 10000, and so does --load-model,
    so the two agree."""
    env = make_env(env_id, seed, render=video_dir is not None)
    if video_dir is not None:
        env = record_video(env, video_dir)
    key, counts, returns, table_np = jax.random.PRNGKey(seed), jnp.zeros(2, jnp.int32), [], np.asarray(table)
    for episode in range(episodes):
        obs, _ = env.reset(seed=seed + episode)
        done = False
        while not done:
            index, key, _, counts = act(nets, params, table, obs[None], key, counts, 0.0, 0.0)
            obs, _, terminated, truncated, info = env.step(env_action(env.action_space, table_np, np.asarray(index))[0])
            done = terminated or truncated
        returns.append(float(info["episode"]["r"]))
    env.close()
    return returns


def record_video(env: gym.Env, video_dir: str) -> gym.Env:
    """Every episode to video_dir, played at the task's real speed: one frame per step of the task's clock."""
    if hasattr(env.unwrapped, "_env"):  # Shimmy's DeepMind Control env declares no frame rate of its own
        env.metadata["render_fps"] = round(1.0 / env.unwrapped._env.control_timestep())
    elif isinstance(getattr(env.unwrapped, "dt", None), float):  # MuJoCo and some classic control (Pendulum: 0.05 s)
        env.metadata["render_fps"] = round(1.0 / env.unwrapped.dt)  # their own render_fps is a display rate
    return gym.wrappers.RecordVideo(env, video_dir, episode_trigger=lambda _: True, disable_logger=True)


def check_rendering(env_id: str) -> None:
    """--capture-video renders at every evaluation: render one frame now, so that a machine without an offscreen
    renderer (or without moviepy, which writes the files) is told at start-up, not after the first training stretch."""
    try:
        import moviepy  # noqa: F401
    except ImportError:
        fail("--capture-video needs moviepy to write the videos (pip install moviepy)")
    env = make_env(env_id, 0, render=True)
    try:
        env.reset(seed=0)
        env.render()
    except Exception as error:
        reason = (str(error).strip().splitlines() or [""])[0].rstrip(".")
        fail(f"--capture-video cannot render {env_id!r} with MUJOCO_GL={os.environ.get('MUJOCO_GL')!r}: "
             f"{type(error).__name__}: {reason}; MuJoCo renders offscreen with libEGL (MUJOCO_GL=egl; e.g. "
             f"apt install libegl1) or OSMesa (MUJOCO_GL=osmesa)")
    finally:
        env.close()


class MetricsLogger:
    """One CSV row per logged step under runs/{run_name}/, mirrored to W&B when tracking. A resumed run keeps
    the rows up to its checkpoint's step and appends after them."""

    def __init__(self, path: str, columns: list, wandb_run=None, resume_step: Optional[int] = None):
        self.columns, self.wandb_run = ["global_step", *columns], wandb_run
        kept = []
        if resume_step is not None and os.path.isfile(path):
            with open(path) as f:
                kept = [row for row in list(f)[1:] if int(row.split(",", 1)[0]) <= resume_step]
        with open(path + ".tmp", "w") as f:
            f.write(",".join(self.columns) + "\n" + "".join(kept))
        os.replace(path + ".tmp", path)
        self.file = open(path, "a", buffering=1)

    def log(self, step: int, metrics: dict) -> None:
        values = {k: float(v) for k, v in metrics.items()}
        self.file.write(",".join([str(step), *(str(values.get(c, "")) for c in self.columns[1:])]) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log(values, step=step)

    def close(self) -> None:
        self.file.close()


def save_arrays(path: str, tree, meta: dict) -> str:
    """A pytree's arrays and a JSON header of what they are in one .npz (a saved model, or a checkpoint: the
    whole run state), written to a temporary file and renamed over the old one: a crash mid-write leaves it
    intact. Replay storage is cut to its filled rows."""
    size = int(tree["buffer"].size) if isinstance(tree, dict) and "buffer" in tree else None
    arrays = {k: np.asarray(v[:size] if k.startswith("['buffer'].storage") else v) for k, v in named_leaves(tree)}
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "wb") as f:
        np.savez(f, __meta__=json.dumps(dict(meta, script=SCRIPT)), **arrays)
    os.replace(path + ".tmp", path)
    return path


def named_leaves(tree) -> list:
    return [(jax.tree_util.keystr(path), leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]


def checkpoint_file(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoint", "state.npz")


def load_arrays(path: str, option: str) -> tuple:
    """(meta, {name: array}) of a file save_arrays wrote with this script, or one line saying why not."""
    if not os.path.isfile(path):
        fail(f"{option}: no such file: {path}" + (" (--checkpoint-frequency writes one)" * (option == "--resume")))
    try:
        with np.load(path) as f:
            arrays = {k: f[k] for k in f.files}
        meta = json.loads(str(arrays.pop("__meta__")))
    except Exception as e:
        fail(f"{option}: {path} is damaged or was not saved by {SCRIPT} ({type(e).__name__})")
    if meta.get("script") != SCRIPT:
        fail(f"{option}: {path} was saved by {meta.get('script')}, not {SCRIPT}")
    return meta, arrays


def restore(template, arrays: dict, option: str):
    """`template` (freshly built parameters or run state) with every array replaced by the saved one."""
    named, leaves = named_leaves(template), []
    if {name for name, _ in named} != set(arrays):
        fail(f"{option}: the file holds {len(arrays)} arrays that do not match this run's {len(named)}")
    for name, like in named:
        saved, shape = arrays[name], np.shape(like)
        fits = saved.shape == shape or (saved.ndim > 0 and saved.shape[1:] == shape[1:] and len(saved) <= shape[0])
        if not fits or saved.dtype != like.dtype:
            fail(f"{option}: the saved {name} is {saved.dtype}{list(saved.shape)}, this run's {like.dtype}{list(shape)}")
        if saved.shape != shape:  # replay storage: its filled rows, the rest zeros as when it was saved
            saved = np.concatenate([saved, np.zeros((shape[0] - len(saved), *shape[1:]), saved.dtype)])
        leaves.append(jnp.asarray(saved) if isinstance(like, jax.Array) else saved)
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(template), leaves)


def new_run_dir(args: Args) -> str:
    """runs/{env_id}__{exp_name}__{seed}__{time}, with -2, -3, ... when a run of the same second took it."""
    env_name = args.env_id.replace("/", "-")  # a namespaced Gymnasium id (dm_control/walker-walk-v0): one folder
    stem = os.path.join("runs", f"{env_name}__{args.exp_name}__{args.seed}__{int(time.time())}")
    for n in itertools.count(1):
        try:
            os.makedirs(stem if n == 1 else f"{stem}-{n}")
            return stem if n == 1 else f"{stem}-{n}"
        except FileExistsError:
            continue


def saved_args(given: Args, saved: dict, option: str, fixed) -> Args:
    """A saved run's own settings, with the flags given here on top, except those in `fixed`, which must agree."""
    args, defaults = Args(**saved), Args()
    for name, value in vars(given).items():
        if value != getattr(defaults, name) and value != getattr(args, name):
            if name in fixed:
                fail(f"{option}: --{flag(name)} {value!r} differs from the saved run's {getattr(args, name)!r}")
            setattr(args, name, value)
    return args


def stop_on_signals() -> list:
    """SIGINT and SIGTERM make the training loop stop after its current step, save and exit; a second aborts."""
    stop = []

    def handler(signum, _frame):
        if stop:
            raise KeyboardInterrupt
        stop.append(signum)
        print(f"\n{signal.Signals(signum).name}: stopping after this step and saving (again to abort)", flush=True)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, handler)
    return stop


def restore_signals() -> None:
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's own, for a caller that goes on
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def check_seed_and_start(args) -> None:
    """Refuse a seed the environments cannot take, before training rather than at the final evaluation: they take
    seeds in [0, 2**32), the N training environments --seed to --seed + N - 1 and the evaluation episodes --seed +
    10000 onwards. Warn of a run that would end before its first update."""
    largest = 2**32 - 1 - max(args.num_envs - 1, 10_000 + args.eval_episodes - 1)
    if not 0 <= args.seed <= largest:
        fail(f"--seed must be in [0, {largest}], got {args.seed}")
    if args.load_model is None and not args.resume and args.learning_starts >= args.total_timesteps:
        print(f"warning: --learning-starts {args.learning_starts} is not below --total-timesteps "
              f"{args.total_timesteps}: the run ends before its first update", file=sys.stderr)


def start_wandb(args, run_name: str, run_dir: str, meta: Optional[dict]):
    """The W&B run of --track (a resumed run continues its own), or one error line where W&B cannot start (most
    often no login): a new run's folder, still empty then, is removed again."""
    import wandb

    try:
        return wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, config=vars(args),
                          name=run_name, save_code=True, id=meta and meta["wandb_id"],
                          resume="allow" if meta else None)
    except (Exception, KeyboardInterrupt) as e:  # the latter: its login prompt in a terminal, left
        if meta is None and os.path.isdir(run_dir) and not os.listdir(run_dir):
            os.rmdir(run_dir)
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        fail(f"--track: W&B could not start: {reason} (WANDB_MODE=offline logs to disk without an account)")


def finished_and_evaluated(run_dir: str, step: int, args) -> bool:
    """Whether a resumed run has nothing left to do: its checkpoint is at --total-timesteps and its final evaluation
    (if it has one) is in metrics.csv. A run stopped during that evaluation still gets it."""
    if step < args.total_timesteps:
        return False
    with open(os.path.join(run_dir, "metrics.csv")) as f:
        return not args.eval_frequency or any(row["global_step"] == str(step) and row["eval/episodic_return"]
                                              for row in csv.DictReader(f))


def evaluation_video_dir(args) -> Optional[str]:
    """Where --capture-video records a --load-model evaluation: beside the model, in videos/evaluation (a training
    run records into its own videos/step{N})."""
    if not args.capture_video:
        return None
    return os.path.join(os.path.dirname(os.path.abspath(args.load_model)), "videos", "evaluation")


def command_path() -> str:
    """This script's path as the user can type it from the working directory (printed commands must run there)."""
    relative = os.path.relpath(os.path.abspath(__file__))
    return os.path.abspath(__file__) if relative.startswith("..") else relative


def neighbour_count(args: Args, num_actions: int) -> int:
    """k: --k when given, else --k-ratio of the actions (at least one)."""
    return args.k if args.k is not None else max(1, round(args.k_ratio * num_actions))


def exploration_epsilon(args: Args, step: int) -> float:
    """--epsilon at environment step `step` (1 = the first): it falls linearly to --end-epsilon over the first
    --exploration-fraction of --total-timesteps, then stays there (CleanRL DQN's linear schedule)."""
    decayed = min(1.0, step / max(1.0, args.exploration_fraction * args.total_timesteps))
    return args.epsilon + decayed * (args.end_epsilon - args.epsilon)


def main(args: Args) -> None:
    started = time.time()
    stop = stop_on_signals()  # from the first moment: a Ctrl-C during start-up stops the run before its loop
    check_args(args)
    meta = saved = None
    if args.resume or args.load_model:  # a checkpoint, or a model: both carry the settings they were made with
        option = "--resume" if args.resume else "--load-model"
        meta, saved = load_arrays(checkpoint_file(args.resume) if args.resume else args.load_model, option)
        fixed = [k for k in vars(args) if k not in RESUME_MAY_CHANGE] if args.resume else MODEL_SETTINGS
        args = saved_args(args, meta["args"], option, fixed)
    check_seed_and_start(args)
    if args.xla_cache:
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(args.xla_cache))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    env = make_env(args.env_id, args.seed)  # one line of error here, not in a worker, for an id it cannot use
    if args.capture_video:
        check_rendering(args.env_id)
    space, example_obs = env.action_space, env.reset(seed=args.seed)[0]
    env.close()
    table_np = action_table(space, args.max_actions, args)
    num_actions, embedding_dim = table_np.shape
    k = neighbour_count(args, num_actions)
    if k > num_actions:
        fail(f"--k must be <= the number of actions ({num_actions}), got {k}")
    if k > SLOW_K or num_actions * embedding_dim > SLOW_TABLE:
        print(f"warning: {num_actions:,} actions of {embedding_dim} dimensions and k = {k:,} make every step slow (the "
              "k-NN reads the whole table, the critic evaluates k actions); for scale, walker-walk's default grid "
              "(262,144 actions, k = 26,214) ran at 3-4 steps/s on a busy 2-core CPU, 4 minutes per 1000-step "
              "evaluation episode, and at 50-100 steps/s with --k 64 or with --max-actions 4096 (docs/wolpertinger.md)",
              file=sys.stderr, flush=True)
    envs = None if args.load_model else make_envs(args.env_id, args.seed, args.num_envs)
    nets = Networks(Actor(embedding_dim), Critic(), k, args.knn == "approx", args.recall_target)
    table = jnp.asarray(table_np)
    key, k_actor, k_critic = jax.random.split(jax.random.PRNGKey(args.seed), 3)
    # One compile each, keyed on the networks' settings, not on these objects: a second main() in one process reuses it.
    init = jax.jit(nn.Module.init, static_argnums=0)
    params = dict(actor=init(nets.actor, k_actor, example_obs[None]),
                  critic=init(nets.critic, k_critic, example_obs[None], table[None, :1]))

    def evaluation(params, label: str, video_dir: Optional[str] = None) -> float:
        returns = evaluate(nets, params, table, args.env_id, args.seed + 10_000, args.eval_episodes, video_dir)
        print(f"{label}  greedy evaluation return {np.mean(returns):.1f} over {len(returns)} episode(s)", flush=True)
        return float(np.mean(returns))

    if args.load_model is not None:  # the run's own evaluation seeds, grid and k
        restore_signals()  # an evaluation has nothing to save: Ctrl-C stops it at once
        video_dir = evaluation_video_dir(args)
        evaluation(restore(params, saved, "--load-model"), f"{args.load_model} on {args.env_id}",  # which task: said
                   video_dir=video_dir)
        if args.capture_video:
            print(f"videos in {video_dir}", flush=True)
        return

    run_dir = args.resume.rstrip("/") if args.resume else new_run_dir(args)
    if meta and finished_and_evaluated(run_dir, meta["global_step"], args):  # no second final evaluation either
        print(f"{run_dir} is already at step {meta['global_step']} of --total-timesteps {args.total_timesteps}: "
              "nothing to train (a larger --total-timesteps continues it)", flush=True)
        return
    run_name, checkpoint_path = os.path.basename(run_dir), checkpoint_file(run_dir)
    wandb_run = None
    if args.track:
        wandb_run = start_wandb(args, run_name, run_dir, meta)
    columns = ["charts/episodic_return", "charts/episodic_length", "charts/SPS", "charts/refine_changed",
               "losses/qf_loss", "losses/actor_loss", "losses/qf_values", "eval/episodic_return"]
    logger = MetricsLogger(os.path.join(run_dir, "metrics.csv"), columns, wandb_run,
                           resume_step=meta and meta["global_step"])
    print(f"{run_name}: {num_actions} actions in {embedding_dim} embedding dims, k = {k} ({args.knn} k-NN), "
          f"{args.num_envs} env(s)", flush=True)

    actor_state = DDPGState.create(apply_fn=None, params=params["actor"], target_params=params["actor"],
                                   tx=adam(args.learning_rate))
    critic_state = DDPGState.create(apply_fn=None, params=params["critic"], target_params=params["critic"],
                                    tx=adam(args.learning_rate))
    transition = dict(obs=example_obs, action=np.zeros(embedding_dim, np.float32), reward=np.float32(0.0),
                      next_obs=example_obs, terminated=np.float32(0.0))  # `action` is the embedding of the action taken
    rows = math.lcm(args.num_envs, args.train_frequency)  # transitions per update call, one update per tf of them
    run = dict(actor_state=jax.tree.map(jnp.asarray, actor_state), critic_state=jax.tree.map(jnp.asarray, critic_state),
               buffer=buffer_init(transition, args.buffer_size), key=key, counts=jnp.zeros(2, jnp.int32),
               pending={k: np.zeros((rows, *np.shape(v)), np.float32) for k, v in transition.items()})
    rng = np.random.default_rng(args.seed)  # the uniformly random actions before learning starts
    global_step, episodes, updates = (meta["global_step"], meta["episodes"], meta["updates"]) if meta else (0, 0, 0)
    if meta:
        run = restore(run, saved, "--resume")
        rng.bit_generator.state = meta["rng"]
        print(f"resumed {run_dir} at step {global_step} (episodes restart; metrics.csv continues)", flush=True)
    actor_state, critic_state, buffer, key, counts, pending = (
        run[k] for k in ("actor_state", "critic_state", "buffer", "key", "counts", "pending"))
    store = jax.jit(buffer_add, donate_argnums=0)
    train = functools.partial(
        update, nets, updates=rows // args.train_frequency, policy_frequency=args.policy_frequency, gamma=args.gamma,
        tau=args.tau, batch_size=args.batch_size, prioritized=args.prioritized_replay, alpha=args.priority_exponent,
        beta=args.importance_exponent, priority_epsilon=args.priority_epsilon, knn_in_target=args.knn_in_target)

    def checkpoint() -> str:
        return save_arrays(checkpoint_path, dict(actor_state=actor_state, critic_state=critic_state, buffer=buffer,
                                                 key=key, counts=counts, pending=pending),
                           dict(args=vars(args), global_step=global_step, episodes=episodes, updates=updates,
                                rng=rng.bit_generator.state, wandb_id=wandb_run and wandb_run.id))

    obs, _ = envs.reset(seed=args.seed)
    outcome, train_metrics, new_returns = "finished", {}, []
    last_log = (time.time(), global_step)
    first_act = max(global_step, -(-args.learning_starts // args.num_envs) * args.num_envs)  # the step it compiles
    try:
        while global_step < args.total_timesteps and not stop:
            if global_step < args.learning_starts:  # uniformly random actions from the host: no device call
                indices = rng.integers(num_actions, size=args.num_envs)
                if global_step + args.num_envs >= args.learning_starts:  # the last of them: the key catches up
                    key, k_update = advance_key(key, global_step // args.num_envs + 1)
            else:
                if global_step == first_act:
                    print(f"step {global_step}: compiling the greedy action (XLA; cache: {args.xla_cache or 'off'}) "
                          "...", flush=True)
                epsilon = exploration_epsilon(args, global_step + 1)
                indices, key, k_update, counts = act(nets, dict(actor=actor_state.params, critic=critic_state.params),
                                                     table, obs, key, counts, args.exploration_noise, epsilon)
                indices = np.asarray(indices)  # the step's one transfer from the device
            next_obs, rewards, terminated, truncated, infos = envs.step(env_action(space, table_np, indices))
            # Same-step autoreset: where an episode ended, next_obs holds the next one's first observation and
            # infos the last one, which is what the transition stores. A time-limit end is not terminal: the
            # target bootstraps through it (partial-episode bootstrapping).
            final_obs = next_obs.copy()
            for i in np.flatnonzero(terminated | truncated):
                final_obs[i], episode = infos["final_obs"][i], infos["final_info"]["episode"]
                logger.log(global_step + args.num_envs, {"charts/episodic_return": episode["r"][i],
                                                         "charts/episodic_length": episode["l"][i]})
                new_returns.append(float(episode["r"][i]))
                episodes += 1
            slot = global_step % rows
            for name, v in dict(obs=obs, action=table_np[indices], reward=rewards, next_obs=final_obs,
                                terminated=terminated).items():
                pending[name][slot: slot + args.num_envs] = v
            obs, previous, global_step = next_obs, global_step, global_step + args.num_envs
            crossed = lambda period: period > 0 and global_step // period > previous // period  # noqa: E731
            if previous == first_act:
                print(f"compiled; first greedy step {time.time() - started:.1f} s after start", flush=True)

            if global_step % rows == 0:
                # A copy: on CPU, jax may read a numpy argument in place after the call has returned (asynchronous
                # dispatch), and `pending` is overwritten from the next step on.
                chunk = {k: v.copy() for k, v in pending.items()}
                if global_step < args.learning_starts:
                    buffer = store(buffer, chunk)
                else:
                    if not train_metrics:  # the first update of this process compiles (or loads from the cache)
                        print(f"step {global_step}: compiling the update ...", flush=True)
                    actor_state, critic_state, buffer, metrics = train(actor_state, critic_state, buffer, chunk,
                                                                       table, k_update,
                                                                       phase=updates % args.policy_frequency)
                    if not train_metrics:  # say so, and time it
                        jax.block_until_ready(critic_state.step)
                        print(f"first update done {time.time() - started:.1f} s after start", flush=True)
                    # The actor's loss comes with the calls that step the actor; the last one stays until the next.
                    train_metrics, updates = {**train_metrics, **metrics}, updates + rows // args.train_frequency

            if crossed(args.log_frequency):
                now, (changed, policy_steps) = time.time(), np.asarray(counts)
                sps = (global_step - last_log[1]) / (now - last_log[0])
                # How often the critic's pick differs from the action nearest the noisy proto-action.
                acting = {"charts/refine_changed": changed / policy_steps} if policy_steps else {}
                logger.log(global_step, {"charts/SPS": sps, **acting, **train_metrics})
                counts, last_log = jnp.zeros(2, jnp.int32), (now, global_step)
                returns = f"{np.mean(new_returns):8.1f}" if new_returns else "       -"
                eta = time.strftime("%H:%M:%S", time.gmtime(max(args.total_timesteps - global_step, 0) / sps))
                print(f"step {global_step:>8}  episodes {episodes:>5}  return {returns}  SPS {sps:.0f}  ETA {eta}",
                      flush=True)
                new_returns.clear()
            if crossed(args.checkpoint_frequency):
                checkpoint()
            if crossed(args.eval_frequency) and global_step < args.total_timesteps:
                video_dir = os.path.join(run_dir, "videos", f"step{global_step}") if args.capture_video else None
                params = dict(actor=actor_state.params, critic=critic_state.params)
                logger.log(global_step, {"eval/episodic_return": evaluation(params, f"step {global_step:>8}",
                                                                            video_dir)})
        outcome = "interrupted" if stop else outcome
    except Exception:
        outcome = "crashed"
        traceback.print_exc()

    saved_to = []  # the final model before the final evaluation; a run that stops early keeps its model too
    params = dict(actor=actor_state.params, critic=critic_state.params)
    try:
        model_path = os.path.join(run_dir, f"{args.exp_name}.npz")
        if args.save_model or outcome != "finished" or os.path.exists(model_path):  # never a stale one
            saved_to.append(save_arrays(model_path, params, dict(args=vars(args), global_step=global_step)))
        if args.checkpoint_frequency:
            saved_to.append(checkpoint())
    except Exception as e:
        print(f"could not save everything: {type(e).__name__}: {e}", flush=True)
    if outcome == "finished" and args.eval_frequency:
        video_dir = os.path.join(run_dir, "videos", f"step{global_step}") if args.capture_video else None
        logger.log(global_step, {"eval/episodic_return": evaluation(params, f"step {global_step:>8}", video_dir)})
    logger.close()
    envs.close()
    if wandb_run is not None:
        wandb_run.finish(exit_code=0 if outcome == "finished" else 1)
    print(f"{outcome} at step {global_step}: metrics in {run_dir}/metrics.csv" + "".join(
        f", saved {path}" for path in saved_to), flush=True)
    if args.checkpoint_frequency and outcome != "finished":
        print(f"continue with: python {command_path()} --resume {run_dir}", flush=True)
    restore_signals()
    if outcome != "finished":
        sys.exit(1 if outcome == "crashed" else 128 + stop[0])


def check_whole_numbers(cls, argv: list) -> None:
    """Refuse a whole-number flag given `nan`, `inf` or `1.5` with one line and status 1, as every other bad input
    is refused (tyro would answer with a boxed message and status 2). Values follow their flag, up to the next flag
    (`--seeds 1 2`), or its `=` (`--seed=1`); `None` is a value of Optional[int] flags."""
    whole = {"--" + name.replace("_", "-"): type(None) in get_args(hint) for name, hint in get_type_hints(cls).items()
             if int in (hint, *get_args(hint))}  # flag -> whether None is allowed
    name = None
    for arg in argv:
        if arg.startswith("--") or arg == "-h":
            name, _, value = arg.partition("=")
            name = name.replace("_", "-")
        else:
            value = arg
        if name in whole and value and not (whole[name] and value == "None"):
            try:
                int(value)
            except ValueError:
                raise SystemExit(f"error: {name}: expected a whole number, got {value!r}")


def tyro_complaint(boxed: str) -> str:
    """tyro's boxed refusal of a command line as one line: its message, and the flags it suggests if any. The box is
    drawn in line-drawing characters, or in ASCII (`-`, `|`, `+`) where the output's encoding has none."""
    border = set(" -|+\u2500\u2502\u256d\u256e\u256f\u2570")
    lines = [line.strip(" |\u2502") for line in boxed.splitlines() if not set(line) <= border]
    message, suggested, part = [], [], "message"
    for line in lines[1:]:  # the first is the box's title
        if line.startswith(("Argument helptext", "For full helptext")):
            part = "done"
        elif line.startswith("Perhaps you meant"):
            part = "suggestions"
        elif part == "message":
            message.append(line)
        elif part == "suggestions" and re.match(r"--[\w-]+$", line.split()[0]):
            suggested.append(line.split()[0])
    said = " ".join(message) or "the command line could not be read (see --help)"
    return said + (f" (did you mean {', '.join(suggested)}?)" if suggested else "")


def parse_command_line(cls):
    """The command line as a `cls`, every refusal one `error:` line and status 1 (tyro's own are boxes, status 2)."""
    check_whole_numbers(cls, sys.argv[1:])
    boxed = io.StringIO()
    try:
        with contextlib.redirect_stderr(boxed):
            return tyro.cli(cls)
    except SystemExit as exit_:
        if not exit_.code:  # --help, printed on stdout
            raise
        raise SystemExit(f"error: {tyro_complaint(boxed.getvalue())}") from None


if __name__ == "__main__":
    main(parse_command_line(Args))
