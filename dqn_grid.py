"""DQN on the bang-off-bang grid: the action-out baseline of the QMLE paper's Fig. 10 ablation.

Every action dimension is cut into 3 bins (-1, 0, 1 of the rescaled box), so D dimensions make 3^D joint actions: an
action-out Q network (qmle_dmc.py's observation stream and joint block, the action stream taken away) has one output
each, and acting and the TD target maximise exactly over all of them. Everything else is qmle_dmc.py's. The head grows
as 3^D: tractable at 2 and 6 dimensions, out of memory soon after (dog: 3^38), the paper's point; the script refuses a
head that does not fit. Tavakoli, Ghiassian, Rakicevic, TMLR 2025, Appendix D.3 and Fig. 10; docs/dqn_grid.md.

    python dqn_grid.py --env-id walker-walk   # Fig. 10's DQN arm at 6 action dimensions (finger-spin: 2)
"""

import atexit
import collections
import ctypes.util
import functools
import json
import math
import os
import pickle
import re
import signal
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any, NamedTuple, Optional

# dm_control picks its renderer when imported: EGL where installed (only --capture-video renders), else none.
os.environ.setdefault("MUJOCO_GL", "egl" if ctypes.util.find_library("EGL") else "disable")
os.environ.setdefault("SDL_VIDEODRIVER", "dummy")  # classic-control tasks render through pygame: no window
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.expanduser("~/.cache/qmle-jax/xla"))  # JAX's disk cache:
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")  # a second run of a configuration starts fast
import cloudpickle
import flax
import flax.linen as nn
import gymnasium as gym
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tyro
from flax.training.train_state import TrainState

try:
    import shimmy  # noqa: F401  (registers the dm_control/* Gymnasium ids)
except ModuleNotFoundError:
    raise
except Exception as e:  # a renderer this machine has but cannot start
    sys.exit(f"error: dm_control cannot start with MUJOCO_GL={os.environ['MUJOCO_GL']} ({e}); MUJOCO_GL=disable runs")
warnings.filterwarnings("ignore", message=".*precision lowered by casting to float32")  # DMC's float64 boxes


@dataclass
class Args:
    env_id: str = "walker-walk"  # DeepMind Control task `domain-task` (e.g. finger-spin) or a Gymnasium Box-action id
    total_timesteps: int = 100_000  # environment steps to train for
    learning_rate: float = 5e-4  # Adam step size
    buffer_size: int = 1_000_000  # replay memory capacity in transitions
    gamma: float = 0.99  # discount factor
    batch_size: int = 256  # transitions per update
    learning_starts: int = 1000  # environment steps before the first update
    train_frequency: int = 10  # environment steps between updates
    target_network_frequency: int = 200  # environment steps between target copies (paper: 2000; release: 200)
    epsilon: float = 0.1  # probability of a uniformly random grid action while training
    prioritized_replay: bool = True  # proportional prioritised replay (--no-prioritized-replay: uniform)
    priority_exponent: float = 0.6  # alpha: how strongly priorities skew sampling
    importance_exponent: float = 0.2  # beta: strength of the importance-sampling correction
    priority_epsilon: float = 1e-6  # added to |TD error|, so that no transition has zero priority

    exp_name: str = os.path.basename(__file__)[: -len(".py")]  # the experiment's name, part of the run folder's name
    seed: int = 1  # seed of the environments, the exploration and the initialisation
    num_envs: int = 1  # environments stepped together (a process each when > 1); updates count all their steps
    track: bool = False  # log the run to Weights & Biases
    wandb_project_name: str = "qmle-jax"  # the Weights & Biases project
    wandb_entity: Optional[str] = None  # the Weights & Biases entity (team)
    capture_video: bool = False  # record the evaluation episodes to runs/{run}/videos (offscreen; needs moviepy)
    save_model: bool = False  # save the parameters, with what gives them meaning, to runs/{run}/{exp_name}.npz
    load_model: Optional[str] = None  # a saved model to evaluate for --eval-episodes episodes instead of training
    checkpoint_frequency: int = 0  # steps between checkpoints of the whole run, also written when it stops (0: off)
    resume: Optional[str] = None  # a checkpointed run's folder (runs/{run}) to continue with its own settings
    eval_frequency: int = 10_000  # environment steps between greedy evaluations (0: never)
    eval_episodes: int = 1  # episodes per greedy evaluation
    log_frequency: int = 1000  # environment steps between console and metrics lines


# ---- the algorithm: network, exact maximisation over the grid, update ----
BINS, HIDDEN = 3, 256  # bins per action dimension (-1, 0, 1 of the rescaled box); the width of the joint block
# What training holds of the head in float32: (HIDDEN + 1) x 3^D each for the parameters, the target, Adam's two
# moments and the gradients (the update donates the state); batch x 3^D each for Q(s), its gradient and Q_target(s').
HEAD_COPIES, BATCH_ARRAYS, LARGE_HEAD = 5, 3, 100_000  # a head of more outputs than LARGE_HEAD is warned of


def grid_action(index, num_dims: int) -> np.ndarray:
    """Joint action indices [...] -> their points of {-1, 0, 1}^D [..., D]: index i is the i-th tuple of
    itertools.product((-1, 0, 1), repeat=D), its base-3 digits (the first dimension the most significant)."""
    powers = BINS ** np.arange(num_dims - 1, -1, -1, dtype=np.int64)
    return ((np.asarray(index, np.int64)[..., None] // powers) % BINS - 1).astype(np.float32)


def head_bytes(num_dims: int, batch_size: int) -> int:  # a Python int: dog-walk's 3^38 x 257 x 4 overflows int64
    return 4 * BINS**num_dims * ((HIDDEN + 1) * HEAD_COPIES + batch_size * BATCH_ARRAYS)


def elu(x):  # through exp, not expm1: equal in float32 and twice as fast on XLA's CPU backend
    return jnp.where(x > 0, x, jnp.exp(jnp.minimum(x, 0.0)) - 1.0)


# PyTorch's nn.Linear weight scale, U(+-1/sqrt(fan_in)), qmle_dmc.py's; pytorch_biases draws the biases alike.
Dense = functools.partial(nn.Dense, kernel_init=nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform"))


def pytorch_biases(params, key):
    """Each dense layer's bias from U(+-1/sqrt(fan_in)) like its weights (LayerNorms' stay 0), as qmle_dmc.py's
    defaults: Fig. 10 compares action-in with action-out, not two initialisations."""
    flat = flax.traverse_util.flatten_dict(params)
    biases = [path for path in flat if path[-1] == "bias" and (*path[:-1], "kernel") in flat]
    for path, k in zip(biases, jax.random.split(key, len(biases))):
        bound = flat[(*path[:-1], "kernel")].shape[0] ** -0.5
        flat[path] = jax.random.uniform(k, flat[path].shape, minval=-bound, maxval=bound)
    return flax.traverse_util.unflatten_dict(flat)


class ResidualBlock(nn.Module):  # x + W2 relu(W1 x), the release's form (a pre-activation ReLU learned slower)
    features: int

    @nn.compact
    def __call__(self, x):
        h = Dense(self.features)(x)  # Dense_0, made before Dense_1: the names hold the parameters
        return x + Dense(self.features)(nn.relu(h))


class QNetwork(nn.Module):
    """Appendix B.1's Q network made action-out: qmle_dmc.py's layers without the action stream, a 3^D-output head.
    The joint block keeps its 256 units: its skip connection carries the 128 observation features into the first
    half and zeros into the action's half (a zero-padded shortcut, He et al. 2016's option A)."""

    num_dims: int

    def setup(self):
        self.obs_embed, self.obs_block, self.obs_norm = Dense(128), ResidualBlock(128), nn.LayerNorm()
        self.joint_in, self.joint_out, self.joint_norm = Dense(HIDDEN), Dense(HIDDEN), nn.LayerNorm()
        self.q_head = Dense(BINS**self.num_dims)

    def __call__(self, obs):  # [..., obs_dim] -> [..., 3^D]
        embedding = elu(self.obs_norm(self.obs_block(self.obs_embed(obs))))
        h = self.joint_out(nn.relu(self.joint_in(embedding)))
        x = jnp.concatenate([embedding, jnp.zeros_like(embedding)], axis=-1)
        return self.q_head(elu(self.joint_norm(x + h)))


@functools.partial(jax.jit, static_argnames=("model",))
def act(model: QNetwork, params, obs, key, epsilon):
    """For N states [N, O] the index of the largest Q, or with probability epsilon a uniform one: the loop's one
    device call per step. Also the next loop key and the update's key."""
    key, k_explore, k_random, k_update = jax.random.split(key, 4)
    greedy = model.apply(params, obs).argmax(-1).astype(jnp.int32)
    random_index = jax.random.randint(k_random, greedy.shape, 0, BINS**model.num_dims)
    explore = jax.random.uniform(k_explore, greedy.shape) < epsilon
    return jnp.where(explore, random_index, greedy), key, k_update


UpdateConfig = collections.namedtuple(
    "UpdateConfig", "updates gamma batch_size prioritized_replay priority_exponent importance_exponent priority_epsilon"
)  # the update's settings: one static argument


class DQNState(TrainState):  # apply_fn unused (None): the model is passed to each jitted function
    target_params: Any


@functools.cache
def adam(learning_rate: float):  # one optimizer per rate, so that a second run in one process compiles nothing
    return optax.adam(learning_rate)


def td_target(model: QNetwork, target_params, batch, gamma: float):
    """r + gamma max_a' Q_target(s', a'), the max exact over the grid; only a termination cuts it (a time-limit end
    bootstraps from the episode's last observation, which the transition stores)."""
    next_q = model.apply(target_params, batch["next_obs"]).max(-1)
    return batch["reward"] + gamma * (1.0 - batch["terminated"]) * next_q


def gradient_step(model: QNetwork, state: DQNState, buffer, key, cfg: UpdateConfig):
    """DQN's replay step: sample, the targets under Q_target, the priorities written back, one Adam step on the
    importance-weighted squared TD error of the stored actions."""
    index, batch, weights = buffer_sample(buffer, key, cfg.batch_size, cfg.prioritized_replay, cfg.importance_exponent)
    target = td_target(model, state.target_params, batch, cfg.gamma)

    def loss_fn(params):
        q = jnp.take_along_axis(model.apply(params, batch["obs"]), batch["action"][:, None], axis=-1)[:, 0]
        td_error = target - q
        return jnp.mean(weights * td_error**2), (td_error, q)

    (td_loss, (td_error, q)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    priority = jnp.abs(td_error) + cfg.priority_epsilon if cfg.prioritized_replay else None
    buffer = buffer_update(buffer, index, priority, cfg.priority_exponent)
    return state.apply_gradients(grads=grads), buffer, {"losses/td_loss": td_loss, "losses/q_values": q.mean()}


# The state is donated too (qmle_dmc.py donates the buffer alone): the new parameters and Adam moments take the old
# ones' place instead of joining them, six head-sized arrays at once instead of eight (XLA's count at 10 dimensions).
@functools.partial(jax.jit, static_argnames=("model", "cfg"), donate_argnames=("state", "buffer"))
def update(model: QNetwork, state: DQNState, buffer, new_transitions, key, cfg: UpdateConfig):
    """The loop's device call per replay period: store the transitions gathered since the last one, then take
    cfg.updates gradient steps (none before --learning-starts)."""
    buffer = buffer_add(buffer, new_transitions)
    if cfg.updates <= 1:  # one step takes the key itself: one environment reproduces its single-environment run
        return gradient_step(model, state, buffer, key, cfg) if cfg.updates else (state, buffer, {})

    def step(carry, k):
        state, buffer, metrics = gradient_step(model, *carry, k, cfg)
        return (state, buffer), metrics

    (state, buffer), metrics = jax.lax.scan(step, (state, buffer), jax.random.split(key, cfg.updates))
    return state, buffer, jax.tree.map(lambda m: m[-1], metrics)


def evaluate(policy, params, args, label: str, video_dir: Optional[str] = None) -> float:
    """Mean greedy return (epsilon 0) over --eval-episodes episodes of a fresh environment reset with seeds --seed +
    10000, + 10001, ..., printed after `label` (--load-model thus scores a model as its run did)."""
    seed, env = args.seed + 10_000, make_env(args.env_id, args.seed + 10_000, video_dir)
    key, returns = jax.random.PRNGKey(seed), []
    for episode in range(args.eval_episodes):
        obs, _ = env.reset(seed=seed + episode)
        done = False
        while not done:
            index, key, _ = policy(params, obs[None], key, 0.0)
            obs, _, terminated, truncated, info = env.step(grid_action(index[0], env.action_space.shape[0]))
            done = terminated or truncated
        returns.append(float(info["episode"]["r"]))
    env.close()
    print(f"{label}  greedy evaluation return {np.mean(returns):.1f} over {len(returns)} episode(s)")
    return float(np.mean(returns))


# === replay buffer: begin (identical in every agent script) ===
class ReplayBuffer(NamedTuple):
    """Device-resident replay memory: `storage` is the transition pytree with a leading capacity axis, `tree` a
    sum-tree of sampling weights (priority ** alpha) laid out heap-style: slot 1 holds the total, slot i's children
    are 2i and 2i + 1, leaf j is slot `leaves + j`. Parents are recomputed from their children: no drift."""

    storage: Any
    tree: jax.Array
    max_weight: jax.Array  # a new transition's weight: the largest seen, so that it is replayed soon
    cursor: jax.Array
    size: jax.Array


def buffer_init(example_transition: Any, capacity: int) -> ReplayBuffer:
    leaves = 1 << max(capacity - 1, 1).bit_length()
    storage = jax.tree.map(lambda x: jnp.zeros((capacity, *jnp.shape(x)), jnp.asarray(x).dtype), example_transition)
    cursor, size = jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32)  # two buffers: the update donates both
    return ReplayBuffer(storage, jnp.zeros(2 * leaves, jnp.float32), jnp.ones((), jnp.float32), cursor, size)


def _tree_set(tree: jax.Array, index: jax.Array, weight: jax.Array) -> jax.Array:
    node = index + tree.shape[0] // 2
    tree = tree.at[node].set(weight)
    for _ in range((tree.shape[0] // 2).bit_length() - 1):
        node = node // 2
        tree = tree.at[node].set(tree[2 * node] + tree[2 * node + 1])
    return tree


def buffer_add(buffer: ReplayBuffer, transitions: Any) -> ReplayBuffer:
    """Write transitions (leading axis n) at the cursor, over the oldest when full."""
    capacity, n = (jax.tree.leaves(tree)[0].shape[0] for tree in (buffer.storage, transitions))
    index = (buffer.cursor + jnp.arange(n)) % capacity
    storage = jax.tree.map(lambda s, x: s.at[index].set(x), buffer.storage, transitions)
    tree = _tree_set(buffer.tree, index, jnp.full(n, buffer.max_weight))
    return ReplayBuffer(
        storage, tree, buffer.max_weight, (buffer.cursor + n) % capacity, jnp.minimum(buffer.size + n, capacity)
    )


def buffer_sample(buffer: ReplayBuffer, key, batch_size: int, prioritized: bool, beta: float, stratified: bool = True):
    """(indices, transitions, importance weights, max 1 in the batch): uniform, or proportional with one draw from each
    of batch_size equal slices of the total (stratified) or each from the whole total (as Stable-Baselines)."""
    if not prioritized:
        index = jax.random.randint(key, (batch_size,), 0, buffer.size)
        return index, jax.tree.map(lambda s: s[index], buffer.storage), jnp.ones(batch_size, jnp.float32)
    leaves, total = buffer.tree.shape[0] // 2, buffer.tree[1]
    uniform = jax.random.uniform(key, (batch_size,))
    target = (jnp.arange(batch_size) + uniform) * (total / batch_size) if stratified else uniform * total
    node = jnp.ones(batch_size, jnp.int32)
    for _ in range(leaves.bit_length() - 1):
        left = buffer.tree[2 * node]
        target, node = jnp.where(target >= left, target - left, target), 2 * node + (target >= left)
    index = jnp.minimum(node - leaves, buffer.size - 1)  # float rounding can step past the last leaf
    weights = (buffer.size * (buffer.tree[index + leaves] / total)) ** -beta
    return index, jax.tree.map(lambda s: s[index], buffer.storage), weights / weights.max()


def buffer_update(buffer: ReplayBuffer, index, priority=None, alpha: float = 1.0, **fields) -> ReplayBuffer:
    """Write back new priorities (raised to alpha here) and/or new values of stored fields at `index`."""
    storage = dict(buffer.storage, **{k: buffer.storage[k].at[index].set(v) for k, v in fields.items()})
    if priority is None:
        return buffer._replace(storage=storage)
    weight = priority.astype(jnp.float32) ** alpha
    tree = _tree_set(buffer.tree, index, weight)
    return buffer._replace(storage=storage, tree=tree, max_weight=jnp.maximum(buffer.max_weight, weight.max()))


# === replay buffer: end ===


# ---- environments and checks ----
def make_env(env_id: str, seed: int, video_dir: Optional[str] = None) -> gym.Env:
    """A DeepMind Control or Gymnasium task with flat float32 observations and actions in [-1, 1]."""
    env = checked_env(env_id, video_dir)
    if not isinstance(env.action_space, gym.spaces.Box) or len(env.action_space.shape) != 1:
        fail(f"--env-id {env_id!r} has {env.action_space} actions; {SCRIPT} needs a one-dimensional Box")
    env = gym.wrappers.RecordEpisodeStatistics(gym.wrappers.RescaleAction(env, -1.0, 1.0))
    env.action_space.seed(seed)
    return env


def check_args(args: Args) -> None:
    check_common(args, "target_network_frequency", "", "")


def check_head(args: Args, num_dims: int, obs_size: int) -> None:
    """Refuse, before it is allocated, a head that does not fit beside a full replay memory; warn of a large one."""
    replay = 0 if args.load_model else args.buffer_size * 4 * (2 * obs_size + 3)  # obs, next_obs, action, r, done
    check_fits(f"--buffer-size {args.buffer_size}", replay)
    need, head = head_bytes(num_dims, args.batch_size), f"--env-id {args.env_id}: a 3^{num_dims}-output head"
    check_fits(f"{head}{' beside a full replay memory' * bool(replay)} (use qmle_dmc.py)", need + replay)
    if BINS**num_dims > LARGE_HEAD:
        print(f"warning: {head} takes {need / 2**30:.1f} GiB in training: a few steps/s at best", file=sys.stderr)


MODEL_SETTINGS = ("env_id",)  # what a saved model's shapes and meaning depend on, besides the script (3 bins, always)


# === run helpers: begin (identical in every agent script) ===
SCRIPT = os.path.basename(__file__)
RUN_SETTINGS = """total_timesteps checkpoint_frequency resume track wandb_project_name wandb_entity capture_video
    save_model eval_frequency eval_episodes log_frequency""".split()  # what a resumed run may change


def fail(message: str):
    raise SystemExit(f"error: {message}")


def check_common(args, positive: str, nonnegative: str, fractions: str) -> None:
    """One `error:` line, before anything starts, for what tyro accepts but a run cannot use."""
    positive += " total_timesteps batch_size train_frequency num_envs eval_episodes log_frequency learning_rate"
    nonnegative += " learning_starts eval_frequency checkpoint_frequency priority_exponent importance_exponent"
    for name, value in vars(args).items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, float) and not math.isfinite(value):
            fail(f"{flag} must be a finite number, got {value}")
        if name in positive.split() and value <= 0 or name in nonnegative.split() and value < 0:
            fail(f"{flag} must be {'> 0' if name in positive.split() else '>= 0'}, got {value}")
        if name in ("gamma", "epsilon", *fractions.split()) and not 0 <= value <= 1:
            fail(f"{flag} must be in [0, 1], got {value}")
    if args.prioritized_replay and args.priority_epsilon <= 0:
        fail(f"--priority-epsilon must be > 0 with prioritised replay, got {args.priority_epsilon}")
    if args.buffer_size < math.lcm(args.num_envs, args.train_frequency):
        fail(f"--buffer-size must hold the lcm of --num-envs and --train-frequency, got {args.buffer_size}")
    largest = 2**32 - max(args.num_envs, 10_000 + args.eval_episodes)  # every reset's seed must be < 2**32
    if not 0 <= args.seed <= largest:
        fail(f"--seed must be in [0, {largest}], got {args.seed}")
    if not re.fullmatch(r"\w[\w.+-]*", args.exp_name):
        fail(f"--exp-name must be a file name of letters, digits and . _ + -, got {args.exp_name!r}")
    batch = args.batch_size * 2**14  # an update's activations, 16 KB a transition (the host's memory: no JAX yet)
    check_fits(f"--batch-size {args.batch_size}", batch, host=True)
    if args.num_envs > 1:  # a worker process each, of at most 0.25 GB (dog-walk's: 0.2 GB)
        check_fits(f"--num-envs {args.num_envs}", args.num_envs * 2**28, host=True)
    if not (args.load_model or args.resume) and args.learning_starts >= args.total_timesteps:
        print("warning: --learning-starts is not below --total-timesteps: no update at all", file=sys.stderr)


def check_fits(what: str, nbytes: int, host: bool = False) -> None:
    """Refuse what does not fit in the memory available: the accelerator's, or the machine's (Linux's estimate)."""
    stats = {} if host else jax.devices()[0].memory_stats() or {}
    meminfo = open("/proc/meminfo").read() if os.path.exists("/proc/meminfo") else "MemAvailable: 1e30"
    ram = 1024 * float(re.search(r"MemAvailable:\s+(\S+)", meminfo)[1])
    available = stats["bytes_limit"] - stats["bytes_in_use"] if stats else ram
    if nbytes > available:
        fail(f"{what} needs {nbytes / 2**30:.3g} GiB, more than the {available / 2**30:.3g} GiB available")


def checked_env(env_id: str, video_dir: Optional[str] = None, render: bool = False) -> gym.Env:
    """gym.make of a DeepMind Control `domain-task` (through Shimmy) or a Gymnasium id, observations flat float32,
    every episode recorded to video_dir if given; one `error:` line where it cannot be made or render."""
    from dm_control import suite

    gym_id = f"dm_control/{env_id}-v0" if tuple(env_id.split("-", 1)) in suite.ALL_TASKS else env_id
    if gym_id not in gym.registry:
        fail(f"unknown --env-id {env_id!r}: a DeepMind Control task (e.g. dog-walk) or a Gymnasium id")
    try:  # a registered id can still fail: a missing extra (Box2D), a renderer that cannot start, no moviepy
        env = gym.make(gym_id, render_mode="rgb_array" if render or video_dir else None)
        env = gym.wrappers.DtypeObservation(gym.wrappers.FlattenObservation(env), np.float32)
        if render:
            import moviepy  # noqa: F401  (RecordVideo writes with it)

            env.reset(seed=0)
            env.render()
    except Exception as e:
        gl, reason = os.environ["MUJOCO_GL"], f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
        fail(f"--env-id {env_id!r} cannot be made{' to render' * render} (MUJOCO_GL={gl}): {reason}")
    if video_dir:  # at the task's own speed: Shimmy's render_fps is a display rate
        dmc = getattr(env.unwrapped, "_env", None)
        dt = dmc.control_timestep() if dmc else getattr(env.unwrapped, "dt", 0)
        env = gym.wrappers.RecordVideo(env, video_dir, lambda _: True, fps=round(1 / dt) if dt else None)
    return env


def make_envs(env_id: str, seed: int, num_envs: int) -> gym.vector.VectorEnv:
    """make_env(env_id, seed + i) for i < num_envs, in a process each for more than one (forked before JAX starts).
    Same-step autoreset: an ended episode's last observation is in infos["final_obs"]."""
    trainer = os.getpid() if num_envs > 1 else None  # Gymnasium makes the first one here too, for its spaces
    fns = [functools.partial(make_worker_env, env_id, seed + i, trainer) for i in range(num_envs)]
    if num_envs == 1:
        return gym.vector.SyncVectorEnv(fns, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
    envs = gym.vector.AsyncVectorEnv(fns, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
    atexit.register(close_envs, envs)  # however the run ends (its workers ignore SIGTERM: the trainer saves them)
    return envs


def close_envs(envs) -> None:  # a worker that cannot be closed (one of them died) is killed: they ignore SIGTERM
    try:
        envs.close()
    except Exception:
        for process in getattr(envs, "processes", []):
            process.kill()


def make_worker_env(env_id: str, seed: int, trainer_pid: Optional[int]) -> gym.Env:
    if trainer_pid not in (None, os.getpid()):  # a worker: signals reach the whole process group; the trainer decides
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, signal.SIG_IGN)
    return Resumable(make_env(env_id, seed))


class Resumable(gym.Wrapper):
    """An environment a checkpoint holds whole (snapshot), simulator and random generators included, so that a
    resumed run goes on with its episodes, and that `envs.set_attr("state", ...)` sets back."""

    def snapshot(self) -> bytes:  # b"": the resumed run starts new episodes in this environment
        u = self.env.unwrapped  # EzPickle's pickle remakes it from its arguments (Gymnasium's MuJoCo and Box2D tasks),
        if isinstance(u, gym.utils.EzPickle) and not type(u).__module__.startswith("shimmy.dm_control"):
            return b""  # but Shimmy's arguments hold the dm_control environment itself
        try:
            return cloudpickle.dumps(self.env)
        except Exception as e:
            print(f"warning: a checkpoint cannot hold this environment: {type(e).__name__}: {e}", file=sys.stderr)
            return b""

    def load(self, data: bytes):  # a snapshot, through envs.set_attr("state", [one per environment])
        made, self.env = self.env, cloudpickle.loads(data)
        made.close()

    state = property(lambda self: None, load)  # set_attr reads the name before setting it: no snapshot just for that


def saved_envs(envs, obs, whole: bool = True) -> dict:  # not whole after a crash: they may be a step ahead of obs
    try:
        states = envs.call("snapshot") if whole else ()
    except Exception as e:  # a worker gone with the run (a SIGTERM to the process group): the rest is still saved
        print(f"warning: the checkpoint holds no environment: {type(e).__name__}: {e}", file=sys.stderr)
        states = ()
    return dict(envs=np.frombuffer(pickle.dumps(states), np.uint8), obs=np.asarray(obs))


def continued_envs(envs, saved: dict, seed: int):  # a checkpoint's observations and states, or new episodes
    states = pickle.loads(saved["envs"].tobytes()) if saved["envs"].size else ()
    if states and all(states):
        try:
            envs.set_attr("state", list(states))
        except Exception as e:  # e.g. written with other versions of the simulator's packages
            fail(f"--resume: the checkpoint's environments cannot be loaded here: {type(e).__name__}: {e}")
        return saved["obs"]
    return envs.reset(seed=seed)[0]


def saved_settings(args):
    """(settings, meta, arrays) of --resume's checkpoint or --load-model's model, the flags given here on top; a
    model's MODEL_SETTINGS and a resumed run's settings outside RUN_SETTINGS must agree with the saved ones."""
    if not (args.resume or args.load_model):
        return args, None, None
    option = "--resume" if args.resume else "--load-model"
    path = os.path.join(args.resume, "checkpoint.npz") if args.resume else args.load_model
    try:
        with np.load(path) as f:
            arrays = {k: f[k] for k in f.files}
        meta = json.loads(str(arrays.pop("__meta__")))
        if meta["script"] != SCRIPT:
            raise ValueError(f"it was saved by {meta['script']}")
        if args.load_model and "wandb_id" in meta:  # only a checkpoint's
            raise ValueError("it is a run's checkpoint: --resume continues the run, and its model is saved beside it")
        saved, defaults = Args(**meta["args"]), Args()
    except Exception as e:
        fail(f"{option}: {path} cannot be used by this {SCRIPT}: {type(e).__name__}: {e}")
    for name, value in vars(args).items():
        if value != getattr(defaults, name) and value != getattr(saved, name):
            if name in MODEL_SETTINGS or (args.resume and name not in RUN_SETTINGS):
                fail(f"{option}: --{name.replace('_', '-')} {value!r} differs from the saved {getattr(saved, name)!r}")
            setattr(saved, name, value)
    saved.resume = args.resume  # a model saved by a resumed run is evaluated, not resumed
    return saved, meta, arrays


def save_arrays(path: str, tree, meta: dict) -> str:
    """A pytree's arrays, named by their paths, and a JSON header of what they are in one .npz, written to a
    temporary file and then renamed, so that a crash while writing leaves the last one whole."""
    arrays = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
    with open(path + ".tmp", "wb") as f:
        np.savez(f, __meta__=json.dumps(dict(meta, script=SCRIPT)), **arrays)
    os.replace(path + ".tmp", path)
    return path


def restore(template, arrays: dict, option: str):
    """`template` (fresh parameters, or run state) with each array replaced by the saved one of the same path."""
    paths, treedef = jax.tree_util.tree_flatten_with_path(template)
    if {jax.tree_util.keystr(k) for k, _ in paths} != set(arrays):
        fail(f"{option}: the saved arrays are not this run's (was it saved by another version of {SCRIPT}?)")
    leaves = [(arrays[jax.tree_util.keystr(k)], v) for k, v in paths]
    return jax.tree_util.tree_unflatten(treedef, [jnp.asarray(a) if isinstance(v, jax.Array) else a for a, v in leaves])


def new_run_dir(args) -> str:
    """runs/{env_id}__{exp_name}__{seed}__{time}, then -2, -3, ... for runs started in the same second."""
    stem = f"runs/{args.env_id.replace('/', '-')}__{args.exp_name}__{args.seed}__{int(time.time())}"
    for run_dir in (f"{stem}-{n}" if n > 1 else stem for n in range(1, 100)):
        try:
            return os.makedirs(run_dir) or run_dir
        except FileExistsError:
            continue
        except OSError as e:
            fail(f"cannot create {run_dir}: {e.strerror}")


class Logger:
    """The run's metrics.csv, a row per logged step (a resumed run keeps the rows up to its checkpoint), and W&B."""

    def __init__(self, args, columns: list, meta: Optional[dict]):
        self.run_dir, self.columns, self.wandb = args.resume or new_run_dir(args), ["global_step", *columns], None
        if args.track:
            import wandb

            project = dict(project=args.wandb_project_name, entity=args.wandb_entity, config=vars(args), save_code=True)
            name, wandb_id = os.path.basename(self.run_dir), meta and meta["wandb_id"]
            try:
                self.wandb = wandb.init(**project, name=name, id=wandb_id, resume="allow")
            except (Exception, KeyboardInterrupt) as e:  # the latter: W&B's login prompt, abandoned
                if not args.resume:
                    os.rmdir(self.run_dir)  # still empty
                reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
                fail(f"--track: W&B cannot start: {reason} (WANDB_MODE=offline logs without an account)")
        self.path = os.path.join(self.run_dir, "metrics.csv")
        rows = open(self.path).readlines()[1:] if meta else []  # a resumed run keeps those up to its checkpoint
        kept = [r for r in rows if int(r.split(",")[0]) <= meta["global_step"]]
        with open(self.path + ".tmp", "w") as f:
            f.write(",".join(self.columns) + "\n" + "".join(kept))
        os.replace(self.path + ".tmp", self.path)
        self.file = open(self.path, "a", buffering=1)

    def log(self, step: int, metrics: dict) -> None:
        values = {k: float(v) for k, v in metrics.items()}
        self.file.write(",".join([str(step), *(str(values.get(c, "")) for c in self.columns[1:])]) + "\n")
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def close(self, finished: bool) -> None:
        self.file.close()
        if self.wandb is not None:
            self.wandb.finish(exit_code=0 if finished else 1)


STOP = []  # the signal that stops the training loop after its current step, once one came


def stop_after_step(signum, _frame):
    """SIGINT and SIGTERM make the training loop stop after its current step and save; a second one aborts."""
    if STOP:
        raise KeyboardInterrupt
    STOP.append(signum)
    print(f"\n{signal.Signals(signum).name}: stopping after this step and saving (again to abort)")


def start(args):
    """A run's first step: from here Ctrl-C and SIGTERM stop it after the current step (--load-model's evaluation, which
    has nothing to save, at once), and progress shows at once in a log file too. Returns saved_settings(args)."""
    STOP.clear()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_DFL if args.load_model else stop_after_step)
    sys.stdout.reconfigure(line_buffering=True)
    return saved_settings(args)


def finish(args, outcome: str, global_step: int, params, logger, envs, final_evaluation, checkpoint) -> None:
    """However a run ends: its model saved (never a stale one), the final evaluation, then the checkpoint (so that a
    resumed run has nothing left to do), the logs closed, and how to continue."""
    model_path, saved_to = os.path.join(logger.run_dir, f"{args.exp_name}.npz"), []
    if args.save_model or outcome != "finished" or os.path.exists(model_path):
        saved_to.append(save_arrays(model_path, params, dict(args=vars(args), global_step=global_step)))
    if outcome == "finished" and args.eval_frequency:
        final_evaluation()
    if args.checkpoint_frequency:
        saved_to.append(checkpoint(whole=outcome != "crashed"))
    logger.close(outcome == "finished")
    close_envs(envs)
    atexit.unregister(close_envs)  # closed: nothing left for the exit to do
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    print(f"{outcome} at step {global_step}: metrics in {logger.path}" + "".join(f", saved {p}" for p in saved_to))
    if outcome != "finished":
        resume = f"continue with: python {sys.argv[0]} --resume {logger.run_dir}"
        print(resume if args.checkpoint_frequency else "this run cannot be continued: no --checkpoint-frequency")


# === run helpers: end ===


METRICS = """charts/episodic_return charts/episodic_length charts/SPS losses/td_loss losses/q_values
    eval/episodic_return""".split()  # metrics.csv's columns, in this order


def main(args: Args) -> None:
    started, stop = time.time(), STOP
    args, meta, saved = start(args)  # a Ctrl-C from here on stops the run after its current step
    check_args(args)
    env = make_env(args.env_id, args.seed)  # one error line here, not in a worker
    (example_obs, _), action_dim = env.reset(seed=args.seed), env.action_space.shape[0]
    if args.capture_video:
        checked_env(args.env_id, render=True).close()
    if args.resume and meta["global_step"] >= args.total_timesteps:
        return print(f"{args.resume} is at step {meta['global_step']}: a larger --total-timesteps continues it")
    envs = None if args.load_model else make_envs(args.env_id, args.seed, args.num_envs)  # forked before JAX starts
    check_head(args, action_dim, example_obs.size)
    model, (key, k_init) = QNetwork(action_dim), jax.random.split(jax.random.PRNGKey(args.seed))
    policy = functools.partial(act, model)
    init = jax.jit(QNetwork.init, static_argnums=0)  # keyed on the model's settings: a second run reuses it
    params = pytorch_biases(init(model, k_init, example_obs[None]), jax.random.fold_in(k_init, 1))
    if args.load_model:  # its run's evaluation seeds: it scores what its run logged
        video_dir = args.capture_video and os.path.join(os.path.dirname(args.load_model), "videos", "evaluation")
        evaluate(policy, restore(params, saved, "--load-model"), args, f"{args.load_model} on {args.env_id}", video_dir)
        return

    transition = dict(obs=example_obs, next_obs=example_obs, action=np.int32(0))  # the action's index in the grid
    transition.update(reward=np.float32(0), terminated=np.float32(0))
    rows = math.lcm(args.num_envs, args.train_frequency)  # transitions per update call
    settings = [getattr(args, name) for name in UpdateConfig._fields[1:]]  # Args' fields of the same names
    cfgs = [UpdateConfig(updates, *settings) for updates in (0, rows // args.train_frequency)]  # before/after starts
    logger, global_step = Logger(args, METRICS, meta), meta["global_step"] if meta else 0
    print(f"{logger.run_dir}: {action_dim} action dims, {BINS**action_dim:,} grid actions, {args.num_envs} env(s)")
    state = DQNState.create(apply_fn=None, params=params, target_params=params, tx=adam(args.learning_rate))
    pending = {k: np.zeros((rows, *np.shape(v)), np.asarray(v).dtype) for k, v in transition.items()}
    run = dict(state=jax.tree.map(jnp.array, state), key=key, pending=pending)  # copies: the update donates each once
    run.update(buffer=buffer_init(transition, args.buffer_size), envs=dict(envs=np.zeros(0, np.uint8), obs=np.zeros(0)))
    run = restore(run, saved, "--resume") if meta else run
    state, buffer, key, pending = (run[k] for k in ("state", "buffer", "key", "pending"))

    def checkpoint(whole=True):  # the whole run state, environments included, so that --resume continues it
        tree = dict(state=state, buffer=buffer, key=key, pending=pending, envs=saved_envs(envs, obs, whole))
        info = dict(args=vars(args), global_step=global_step, wandb_id=logger.wandb and logger.wandb.id)
        return save_arrays(os.path.join(logger.run_dir, "checkpoint.npz"), tree, info)

    def evaluation():  # logged at this step; videos into videos/step{N}
        video_dir = args.capture_video and f"{logger.run_dir}/videos/step{global_step}"
        mean = evaluate(policy, state.params, args, f"step {global_step:>8}", video_dir)
        logger.log(global_step, {"eval/episodic_return": mean})

    crossed = lambda period: period > 0 and global_step // period > previous // period  # passed a multiple of it?
    obs = continued_envs(envs, run["envs"], args.seed)
    outcome, metrics, returns, last_log = "crashed", {}, [], (time.time(), global_step)
    print("compiling the greedy action (XLA) ...")
    try:
        while global_step < args.total_timesteps and not stop:
            indices, key, k_update = policy(state.params, obs, key, args.epsilon)
            indices = np.asarray(indices)  # the step's one transfer from the device
            next_obs, rewards, terminated, truncated, infos = envs.step(grid_action(indices, action_dim))
            final_obs = next_obs.copy()  # where an episode ended: its own last observation, not the next one's first
            for i in np.flatnonzero(terminated | truncated):  # a time limit is no termination: targets bootstrap
                final_obs[i], episode = infos["final_obs"][i], infos["final_info"]["episode"]
                stats = {"charts/episodic_return": episode["r"][i], "charts/episodic_length": episode["l"][i]}
                logger.log(global_step + args.num_envs, stats)
                returns.append(float(episode["r"][i]))
            new = dict(obs=obs, action=indices, reward=rewards, next_obs=final_obs, terminated=terminated)
            for k, v in new.items():
                pending[k][global_step % rows : global_step % rows + args.num_envs] = v
            obs, previous, global_step = next_obs, global_step, global_step + args.num_envs
            if global_step % rows == 0:  # store the period's transitions, then learn from the buffer
                learn = global_step >= args.learning_starts
                if learn and not metrics:
                    print(f"step {global_step}: compiling the update ...")
                chunk = {k: v.copy() for k, v in pending.items()}  # jax may read numpy inputs after returning
                state, buffer, metrics = update(model, state, buffer, chunk, k_update, cfgs[learn])
            if crossed(args.target_network_frequency):  # a copy: the update donates each array once
                state = state.replace(target_params=jax.tree.map(jnp.copy, state.params))
            if crossed(args.log_frequency):
                now = time.time()
                sps = (global_step - last_log[1]) / (now - last_log[0])
                logger.log(global_step, {"charts/SPS": sps, **metrics})
                eta = time.strftime("%H:%M:%S", time.gmtime((args.total_timesteps - global_step) / sps))
                mean, seconds = np.mean(returns or np.nan), now - started
                print(f"step {global_step:>8}  return {mean:8.1f}  SPS {sps:4.0f}  ETA {eta}  ({seconds:.0f} s so far)")
                last_log, returns = (now, global_step), []
            if crossed(args.checkpoint_frequency) and global_step < args.total_timesteps:
                checkpoint()
            if crossed(args.eval_frequency) and global_step < args.total_timesteps:
                evaluation()
        outcome = "interrupted" if stop else "finished"
    finally:  # a crash's traceback follows, after the model and the checkpoint are saved
        finish(args, outcome, global_step, state.params, logger, envs, evaluation, checkpoint)
    if stop:
        sys.exit(128 + stop[0])


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `--help | head -1` ends quietly, as other commands do
    parsed = tyro.cli(Args)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    main(parsed)
