"""DQN on the bang-off-bang grid: the action-out baseline of the QMLE paper's Fig. 10 ablation.

Every action dimension is cut into 3 bins (low, middle, high: -1, 0, 1 of the rescaled box), so a task with D
action dimensions has 3^D joint actions. An action-out Q network, qmle_dmc.py's observation torso and joint block
with the action input taken away, has one output per joint action; acting and the TD target maximise exactly over
all of them. Everything else (prioritised replay, epsilon, update cadence, target copies, optimiser) is
qmle_dmc.py's. The head grows as 3^D: tractable at 2 and 6 dimensions, out of memory soon after (quadruped: 3^12
= 531,441 outputs; dog: 3^38), which is the paper's point. The script refuses a head it cannot hold.

Paper: Tavakoli, Ghiassian, Rakicevic, "Learning in complex action spaces without policy gradients",
TMLR 2025 (arXiv 2410.06317), Appendix D.3 and Fig. 10 (DQN arm; the QMLE arm is qmle_dmc.py):

    python dqn_grid.py --env-id finger-spin
    python dqn_grid.py --env-id walker-walk
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

import flax
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
    """path of a saved model: evaluate it greedily for --eval-episodes episodes instead of training"""

    env_id: str = "walker-walk"
    """DeepMind Control id `domain-task` (e.g. finger-spin, walker-walk) or a Gymnasium Box-action id"""
    total_timesteps: int = 100_000
    """environment steps to train for"""
    learning_rate: float = 5e-4
    """Adam step size"""
    buffer_size: int = 1_000_000
    """replay memory capacity in transitions"""
    gamma: float = 0.99
    """discount factor"""
    batch_size: int = 256
    """transitions per update"""
    learning_starts: int = 1000
    """environment steps before the first update"""
    train_frequency: int = 10
    """environment steps between updates"""
    target_network_frequency: int = 200
    """environment steps between hard copies of Q into the target (QMLE paper: 2000; its release: 200)"""
    epsilon: float = 0.1
    """probability of a uniformly random grid action while training"""
    prioritized_replay: bool = True
    """proportional prioritised replay; --no-prioritized-replay samples uniformly"""
    priority_exponent: float = 0.6
    """alpha: how strongly priorities skew sampling"""
    importance_exponent: float = 0.2
    """beta: strength of the importance-sampling correction"""
    priority_epsilon: float = 1e-6
    """added to abs TD error so no transition gets zero priority"""

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
    at_least = dict(total_timesteps=1, batch_size=1, train_frequency=1, num_envs=1, target_network_frequency=1,
                    eval_episodes=1, log_frequency=1)
    at_least_zero = dict(learning_starts=0, eval_frequency=0, checkpoint_frequency=0, priority_exponent=0.0,
                         importance_exponent=0.0)
    for name, low in {**at_least, **at_least_zero}.items():
        if getattr(args, name) < low:
            fail(f"--{flag(name)} must be >= {low}, got {getattr(args, name)}")
    for name in ("gamma", "epsilon"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            fail(f"--{flag(name)} must be in [0, 1], got {getattr(args, name)}")
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
MODEL_SETTINGS = ("env_id",)  # what a saved model's shapes and meaning depend on, besides the script (3 bins, always)
RESUME_MAY_CHANGE = ("total_timesteps", "checkpoint_frequency", "resume", "xla_cache", "track", "wandb_project_name",
                     "wandb_entity", "capture_video", "save_model", "eval_frequency", "eval_episodes", "log_frequency")


def dmc_gym_id(env_id: str) -> Optional[str]:
    """`walker-walk` -> `dm_control/walker-walk-v0` when it names a suite task, else None."""
    from dm_control import suite

    return f"dm_control/{env_id}-v0" if tuple(env_id.split("-", 1)) in suite.ALL_TASKS else None


def make_env(env_id: str, seed: int, render: bool = False) -> gym.Env:
    """A Gymnasium env with float32 flat observations and actions rescaled to [-1, 1]."""
    gym_id = dmc_gym_id(env_id) or env_id
    if gym_id not in gym.registry:
        from dm_control import suite

        dmc = ", ".join(f"{d}-{t}" for d, t in suite.ALL_TASKS)
        fail(f"unknown --env-id {env_id!r}; DeepMind Control ids: {dmc}; or any Gymnasium id with Box actions")
    try:  # a registered id can still fail to build: a missing extra (Box2D), an id moved to another package
        env = gym.make(gym_id, render_mode="rgb_array" if render else None)
    except Exception as error:
        reason = (str(error).strip().splitlines() or [""])[0]
        fail(f"--env-id {env_id!r} is registered but cannot be made: {type(error).__name__}: {reason}")
    if not isinstance(env.action_space, gym.spaces.Box) or len(env.action_space.shape) != 1:
        fail(f"--env-id {env_id!r} has {env.action_space} actions; {SCRIPT} needs a one-dimensional Box")
    observations = env.observation_space
    try:
        env = gym.wrappers.FlattenObservation(env)
        flat = isinstance(env.observation_space, gym.spaces.Box) and len(env.observation_space.shape) == 1
    except Exception:
        flat = False
    if not flat:
        fail(f"--env-id {env_id!r} has {observations} observations, which do not flatten to a vector")
    env = gym.wrappers.DtypeObservation(env, np.float32)
    env = gym.wrappers.RescaleAction(env, -1.0, 1.0)  # every search below happens in [-1, 1]^D
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


BINS = 3  # per action dimension: low, middle, high, the values -1, 0, 1 of the rescaled box
HIDDEN = 256  # the features the head reads: the width of qmle_dmc.py's joint block
# What training holds of the head at once. (HIDDEN + 1) x 3^D float32 each: the parameters, the target parameters,
# Adam's two moments and the gradients (the update donates the state, so its new copy replaces the old one). And
# batch x 3^D float32 each: Q(s) and its gradient, and Q_target(s'). The rest of the network is under 1 MiB.
HEAD_COPIES, BATCH_ARRAYS = 5, 3
LARGE_HEAD = 100_000  # more outputs than this: say at start-up what the head takes


def grid_action(index, num_dims: int) -> np.ndarray:
    """Joint action indices [...] -> their points of {-1, 0, 1}^D [..., D]: an index's base-3 digits, the first
    dimension the most significant, so index i is the i-th tuple of itertools.product((-1, 0, 1), repeat=D)."""
    powers = BINS ** np.arange(num_dims - 1, -1, -1, dtype=np.int64)
    return ((np.asarray(index, np.int64)[..., None] // powers) % BINS - 1).astype(np.float32)


def head_bytes(num_dims: int, batch_size: int) -> int:
    """Memory the 3^D-output head takes in training, in bytes (a Python int: 3^38 x 257 x 4 overflows int64)."""
    return 4 * BINS ** num_dims * ((HIDDEN + 1) * HEAD_COPIES + batch_size * BATCH_ARRAYS)


def bytes_text(n: int) -> str:
    """1536 -> '1.5 KiB', up to YiB (the dog-walk head is counted in ZiB)."""
    units = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB", "ZiB", "YiB")
    power = min(max(n.bit_length() - 1, 0) // 10, len(units) - 1)
    return f"{n / 1024 ** power:,.1f}".removesuffix(".0") + f" {units[power]}"


def available_memory() -> tuple:
    """(bytes, a phrase saying where) the run can use: the accelerator's limit when JAX's default backend is one,
    else what the kernel counts as available to a new process (MemAvailable), else the physical memory."""
    device = jax.devices()[0]
    limit = (device.memory_stats() or {}).get("bytes_limit") if device.platform != "cpu" else None
    if limit:
        return int(limit), f"the {device.device_kind} has {bytes_text(int(limit))}"
    try:
        with open("/proc/meminfo") as f:
            available = 1024 * next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
        return available, f"this machine has {bytes_text(available)} available"
    except (OSError, StopIteration, ValueError):
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return physical, f"this machine has {bytes_text(physical)}"


def check_head(env_id: str, num_dims: int, batch_size: int, replay_bytes: int = 0) -> None:
    """Refuse, before anything is allocated, a head that does not fit in the memory the run has beside its replay
    memory (`replay_bytes`, full); warn of a large one."""
    outputs, need = BINS ** num_dims, head_bytes(num_dims, batch_size)
    have, where = available_memory()
    head = f"its 3^{num_dims} = {f'{outputs:,}' if outputs < 10**9 else f'{outputs:.3g}'}-output head"
    if need + replay_bytes > have:
        beside = f" beside the replay memory's {bytes_text(replay_bytes)}" if replay_bytes else ""
        fail(f"{env_id} has {num_dims} action dimensions: {head} would need {bytes_text(need)} of memory{beside} "
             f"({where}); DQN on the bang-off-bang grid is intractable here, use qmle_dmc.py")
    if outputs > LARGE_HEAD:
        print(f"warning: {env_id} has {num_dims} action dimensions: {head} takes about {bytes_text(need)} in "
              f"training ({where}); every step reads all of it and every update several times over, so expect a few "
              "steps/s at best (quadruped-walk, 12 dimensions: about 1 step/s on a busy 2-core CPU; docs/dqn_grid.md)",
              file=sys.stderr, flush=True)


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


def elu(x):
    """ELU through exp, not expm1: equal to float32 precision and twice as fast on XLA's CPU backend."""
    return jnp.where(x > 0, x, jnp.exp(jnp.minimum(x, 0.0)) - 1.0)


# PyTorch nn.Linear's default weight scale, U(+-1/sqrt(fan_in)): qmle_dmc.py's layers (biases: pytorch_biases).
Dense = functools.partial(nn.Dense, kernel_init=nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform"))


def pytorch_biases(params, key):
    """Every dense layer's bias drawn from U(+-1/sqrt(fan_in)) like its weights, PyTorch's default and qmle_dmc.py's
    (--bias-init uniform), so that Fig. 10 compares action-in with action-out, not two initialisations."""
    flat = flax.traverse_util.flatten_dict(params)
    biases = [path for path in flat if path[-1] == "bias" and (*path[:-1], "kernel") in flat]  # not LayerNorms'
    for path, k in zip(biases, jax.random.split(key, len(biases))):
        bound = flat[(*path[:-1], "kernel")].shape[0] ** -0.5
        flat[path] = jax.random.uniform(k, flat[path].shape, minval=-bound, maxval=bound)
    return flax.traverse_util.unflatten_dict(flat)


class ResidualBlock(nn.Module):
    """x + W2 relu(W1 x): a residual block of two dense layers, width preserved, in the authors' release's
    form (the LayerNorm after it normalises the sum). Its input is used as it is, negative half included; a
    ReLU in front of W1 (the pre-activation form) learned walker-walk markedly slower here."""

    features: int

    @nn.compact
    def __call__(self, x):
        h = Dense(self.features)(x)
        return x + Dense(self.features)(nn.relu(h))


class QNetwork(nn.Module):
    """Appendix B.1's Q network made action-out: one output per joint action of the 3^D grid.

    The observation stream is qmle_dmc.py's. Its joint block, the action stream taken away, keeps its 256 units:
    the skip connection carries the 128 observation features into the first half of them and nothing into the
    half the action's features filled (a zero-padded shortcut, He et al. 2016's option A). So the layers are
    qmle_dmc.py's Q network's without its action stream, and the head is 3^D wide instead of 1.
    """

    num_dims: int

    def setup(self):
        self.obs_embed, self.obs_block, self.obs_norm = Dense(128), ResidualBlock(128), nn.LayerNorm()
        self.joint_in, self.joint_out, self.joint_norm = Dense(HIDDEN), Dense(HIDDEN), nn.LayerNorm()
        self.q_head = Dense(BINS ** self.num_dims)

    def __call__(self, obs):  # [..., obs_dim] -> [..., 3^D]
        embedding = elu(self.obs_norm(self.obs_block(self.obs_embed(obs))))
        h = self.joint_out(nn.relu(self.joint_in(embedding)))
        x = jnp.concatenate([embedding, jnp.zeros_like(embedding)], axis=-1)
        return self.q_head(elu(self.joint_norm(x + h)))


class DQNState(TrainState):  # apply_fn unused (None): the model is passed to each jitted function instead
    target_params: Any


@functools.cache
def adam(learning_rate: float) -> optax.GradientTransformation:
    """One optimizer object per learning rate. It sits in the train state's static part, so a second main() in one
    process (the tests run many) finds the update already compiled instead of compiling it again."""
    return optax.adam(learning_rate)


@functools.partial(jax.jit, static_argnames=("model",))
def act(model: QNetwork, params, obs, key, epsilon):
    """The training loop's one device call per step: for each of N states [N, O] the index of its largest Q, or
    with probability epsilon a uniformly random index; and the next loop key and the update's key."""
    key, k_explore, k_random, k_update = jax.random.split(key, 4)
    greedy = model.apply(params, obs).argmax(-1).astype(jnp.int32)
    random_index = jax.random.randint(k_random, greedy.shape, 0, BINS ** model.num_dims)
    explore = jax.random.uniform(k_explore, greedy.shape) < epsilon
    return jnp.where(explore, random_index, greedy), key, k_update


def td_target(model: QNetwork, target_params, batch, gamma: float):
    """r + gamma_{t+1} max_a' Q_target(s', a'), the max exact over the grid. gamma_{t+1} is 0 only where s' is
    terminal; a time-limit end bootstraps from the episode's last observation, which the transition stores."""
    next_q = model.apply(target_params, batch["next_obs"]).max(-1)
    return batch["reward"] + gamma * (1.0 - batch["terminated"]) * next_q


def gradient_step(model: QNetwork, state: DQNState, buffer: ReplayBuffer, key, *, gamma: float, batch_size: int,
                  prioritized: bool, alpha: float, beta: float, priority_epsilon: float):
    """DQN's replay step: sample, compute targets under Q_target, write priorities back, take one Adam step on the
    IS-weighted squared TD error."""
    index, batch, weights = buffer_sample(buffer, key, batch_size, prioritized, beta)
    target = td_target(model, state.target_params, batch, gamma)

    def loss_fn(params):
        q = jnp.take_along_axis(model.apply(params, batch["obs"]), batch["action"][:, None], axis=-1)[:, 0]
        td_error = target - q
        return jnp.mean(weights * td_error**2), (td_error, q)

    (td_loss, (td_error, q)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    buffer = buffer_update(buffer, index, jnp.abs(td_error) + priority_epsilon if prioritized else None, alpha)
    return state.apply_gradients(grads=grads), buffer, {"losses/td_loss": td_loss, "losses/q_values": q.mean()}


# The state is donated as well as the buffer (qmle_dmc.py donates the buffer only): the new parameters and Adam
# moments take the old ones' place instead of joining them. XLA's accounting at 10 dimensions: six head-sized
# arrays at once (the state's four and two temporaries) instead of eight.
@functools.partial(jax.jit, donate_argnames=("state", "buffer"), static_argnames=(
    "model", "updates", "batch_size", "prioritized", "alpha", "beta", "priority_epsilon"))
def update(model: QNetwork, state: DQNState, buffer: ReplayBuffer, new_transitions, key, *, updates: int = 1,
           **settings):
    """One device call per replay period: store the transitions gathered since the last call, then take
    `updates` gradient steps (one per --train-frequency environment steps they span)."""
    buffer = buffer_add(buffer, new_transitions)
    if updates == 1:  # the key itself: one environment reproduces the single-environment runs exactly
        return gradient_step(model, state, buffer, key, **settings)
    step = lambda carry, k: (lambda s, b, m: ((s, b), m))(*gradient_step(model, *carry, k, **settings))  # noqa: E731
    (state, buffer), metrics = jax.lax.scan(step, (state, buffer), jax.random.split(key, updates))
    return state, buffer, jax.tree.map(lambda m: m[-1], metrics)


def evaluate(model: QNetwork, params, env_id: str, seed: int, episodes: int, video_dir: Optional[str] = None) -> list:
    """Greedy returns (epsilon 0) of `episodes` episodes on a fresh environment reset with seed, seed + 1, ...
    Training evaluates with --seed + 10000, and so does --load-model, so the two agree."""
    env = make_env(env_id, seed, render=video_dir is not None)
    if video_dir is not None:
        env = record_video(env, video_dir)
    key, returns = jax.random.PRNGKey(seed), []
    for episode in range(episodes):
        obs, _ = env.reset(seed=seed + episode)
        done = False
        while not done:
            index, key, _ = act(model, params, obs[None], key, 0.0)
            obs, _, terminated, truncated, info = env.step(grid_action(index[0], model.num_dims))
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
    action_dim = env.action_space.shape[0]
    example_obs, _ = env.reset(seed=args.seed)
    env.close()
    # Before the head, or anything else, is allocated; a full replay memory holds obs, next_obs, action, reward and
    # terminated (4 bytes each) per transition.
    replay_bytes = 0 if args.load_model else args.buffer_size * 4 * (2 * example_obs.size + 3)
    check_head(args.env_id, action_dim, args.batch_size, replay_bytes)
    envs = None if args.load_model else make_envs(args.env_id, args.seed, args.num_envs)
    model = QNetwork(action_dim)
    key, k_init = jax.random.split(jax.random.PRNGKey(args.seed))
    # One compile, keyed on the model's settings, not on this model object: a second main() in one process reuses it.
    params = jax.jit(QNetwork.init, static_argnums=0)(model, k_init, example_obs[None])
    params = pytorch_biases(params, jax.random.fold_in(k_init, 1))

    def evaluation(params, label: str, video_dir: Optional[str] = None) -> float:
        returns = evaluate(model, params, args.env_id, args.seed + 10_000, args.eval_episodes, video_dir)
        print(f"{label}  greedy evaluation return {np.mean(returns):.1f} over {len(returns)} episode(s)", flush=True)
        return float(np.mean(returns))

    if args.load_model is not None:  # the run's own evaluation seeds, unless given here
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
    columns = ["charts/episodic_return", "charts/episodic_length", "charts/SPS", "losses/td_loss", "losses/q_values",
               "eval/episodic_return"]
    logger = MetricsLogger(os.path.join(run_dir, "metrics.csv"), columns, wandb_run,
                           resume_step=meta and meta["global_step"])
    print(f"{run_name}: {action_dim} action dims, {BINS ** action_dim:,} grid actions, {args.num_envs} env(s)",
          flush=True)

    # The target starts as a copy, not as the same arrays: the update donates the state, and a buffer that two of
    # its leaves shared would be given away twice.
    state = DQNState.create(apply_fn=None, params=params, target_params=jax.tree.map(jnp.copy, params),
                            tx=adam(args.learning_rate))
    # `action` is the index of the grid action taken; int32 holds any head the memory check lets through (3^19
    # outputs, the last below 2^31, would need 8.7 TiB).
    transition = dict(obs=example_obs, action=np.int32(0), reward=np.float32(0.0), next_obs=example_obs,
                      terminated=np.float32(0.0))
    rows = math.lcm(args.num_envs, args.train_frequency)  # transitions per update call, one update per tf of them
    run = dict(state=jax.tree.map(jnp.asarray, state), buffer=buffer_init(transition, args.buffer_size), key=key,
               pending={k: np.zeros((rows, *np.shape(v)), np.asarray(v).dtype) for k, v in transition.items()})
    global_step, episodes = (meta["global_step"], meta["episodes"]) if meta else (0, 0)
    if meta:
        run = restore(run, saved, "--resume")
        print(f"resumed {run_dir} at step {global_step} (episodes restart; metrics.csv continues)", flush=True)
    state, buffer, key, pending = (run[k] for k in ("state", "buffer", "key", "pending"))
    store = jax.jit(buffer_add, donate_argnums=0)
    train = functools.partial(
        update, model, updates=rows // args.train_frequency, gamma=args.gamma, batch_size=args.batch_size,
        prioritized=args.prioritized_replay, alpha=args.priority_exponent, beta=args.importance_exponent,
        priority_epsilon=args.priority_epsilon)

    def checkpoint() -> str:
        return save_arrays(checkpoint_path, dict(state=state, buffer=buffer, key=key, pending=pending),
                           dict(args=vars(args), global_step=global_step, episodes=episodes,
                                wandb_id=wandb_run and wandb_run.id))

    obs, _ = envs.reset(seed=args.seed)
    outcome, train_metrics, new_returns = "finished", {}, []
    first_step, last_log = global_step, (time.time(), global_step)
    print(f"compiling the greedy action (XLA; cache: {args.xla_cache or 'off'}) ...", flush=True)
    try:
        while global_step < args.total_timesteps and not stop:
            indices, key, k_update = act(model, state.params, obs, key, args.epsilon)
            indices = np.asarray(indices)  # the step's one transfer from the device
            next_obs, rewards, terminated, truncated, infos = envs.step(grid_action(indices, action_dim))
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
            for k, v in dict(obs=obs, action=indices, reward=rewards, next_obs=final_obs,
                             terminated=terminated).items():
                pending[k][slot: slot + args.num_envs] = v
            obs, previous, global_step = next_obs, global_step, global_step + args.num_envs
            crossed = lambda period: period > 0 and global_step // period > previous // period  # noqa: E731
            if previous == first_step:
                print(f"compiled; first step {time.time() - started:.1f} s after start", flush=True)

            if global_step % rows == 0:
                # A copy: on CPU, jax may read a numpy argument in place after the call has returned (asynchronous
                # dispatch), and `pending` is overwritten from the next step on.
                chunk = {k: v.copy() for k, v in pending.items()}
                if global_step < args.learning_starts:
                    buffer = store(buffer, chunk)
                elif train_metrics:
                    state, buffer, train_metrics = train(state, buffer, chunk, k_update)
                else:  # the first update of this process compiles (or loads from the cache): say so, and time it
                    print(f"step {global_step}: compiling the update ...", flush=True)
                    state, buffer, train_metrics = train(state, buffer, chunk, k_update)
                    jax.block_until_ready(state.step)
                    print(f"first update done {time.time() - started:.1f} s after start", flush=True)
            if crossed(args.target_network_frequency):  # a copy, for the same reason as at the start
                state = state.replace(target_params=jax.tree.map(jnp.copy, state.params))

            if crossed(args.log_frequency):
                now = time.time()
                sps = (global_step - last_log[1]) / (now - last_log[0])
                logger.log(global_step, {"charts/SPS": sps, **train_metrics})
                last_log = (now, global_step)
                returns = f"{np.mean(new_returns):8.1f}" if new_returns else "       -"
                eta = time.strftime("%H:%M:%S", time.gmtime(max(args.total_timesteps - global_step, 0) / sps))
                print(f"step {global_step:>8}  episodes {episodes:>5}  return {returns}  SPS {sps:.0f}  ETA {eta}",
                      flush=True)
                new_returns.clear()
            if crossed(args.checkpoint_frequency):
                checkpoint()
            if crossed(args.eval_frequency) and global_step < args.total_timesteps:
                video_dir = os.path.join(run_dir, "videos", f"step{global_step}") if args.capture_video else None
                logger.log(global_step, {"eval/episodic_return": evaluation(
                    state.params, f"step {global_step:>8}", video_dir)})
        outcome = "interrupted" if stop else outcome
    except Exception:
        outcome = "crashed"
        traceback.print_exc()

    saved_to = []  # the final model before the final evaluation; a run that stops early keeps its model too
    try:
        model_path = os.path.join(run_dir, f"{args.exp_name}.npz")
        if args.save_model or outcome != "finished" or os.path.exists(model_path):  # never a stale one
            saved_to.append(save_arrays(model_path, state.params, dict(args=vars(args), global_step=global_step)))
        if args.checkpoint_frequency:
            saved_to.append(checkpoint())
    except Exception as e:
        print(f"could not save everything: {type(e).__name__}: {e}", flush=True)
    if outcome == "finished" and args.eval_frequency:
        video_dir = os.path.join(run_dir, "videos", f"step{global_step}") if args.capture_video else None
        logger.log(global_step, {"eval/episodic_return": evaluation(state.params, f"step {global_step:>8}", video_dir)})
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
