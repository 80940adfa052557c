"""QT-Opt: Q-learning with cross-entropy-method maximisation, on the DeepMind Control Suite.

max_a Q(s, a) is approximated by the cross-entropy method (CEM): sample actions from a Gaussian over the action box,
evaluate Q on them, refit the Gaussian to the best (its std floored), repeat, and take the best sample seen. The TD
target is clipped double Q: the minimum of two lagged target networks at the first one's CEM arg-max. The Q network is
qmle_dmc.py's, so that only the maximiser differs. Kalashnikov et al., "QT-Opt: Scalable Deep Reinforcement Learning
for Vision-Based Robotic Manipulation", CoRL 2018 (64 samples, 6 elites, 2 iterations); docs/qtopt_cem.md.

    python qtopt_cem.py --env-id walker-walk   # the baseline QMLE is compared against (Tavakoli et al. 2025)
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
    env_id: str = "walker-walk"  # DeepMind Control task `domain-task` (e.g. dog-walk) or a Gymnasium Box-action id
    total_timesteps: int = 100_000  # environment steps to train for
    learning_rate: float = 5e-4  # Adam step size
    buffer_size: int = 1_000_000  # replay memory capacity in transitions
    gamma: float = 0.99  # discount factor
    batch_size: int = 256  # transitions per update
    learning_starts: int = 1000  # environment steps before the first update
    train_frequency: int = 10  # environment steps between updates
    target_network_frequency: int = 200  # steps between target copies: Q into the first, the first into the second
    epsilon: float = 0.1  # probability of a uniformly random action while training
    prioritized_replay: bool = True  # proportional prioritised replay (--no-prioritized-replay: uniform)
    priority_exponent: float = 0.6  # alpha: how strongly priorities skew sampling
    importance_exponent: float = 0.2  # beta: strength of the importance-sampling correction
    priority_epsilon: float = 1e-6  # added to |TD error|, so that no transition has zero priority
    cem_samples: int = 64  # actions CEM samples and evaluates per iteration (paper: 64; TF-Agents: 32)
    cem_elites: int = 6  # highest-Q samples the Gaussian is refitted to (paper: 6; TF-Agents: 4)
    cem_iterations: int = 2  # sample-and-refit rounds (paper: 2; TF-Agents: 3)
    cem_min_std: float = 0.01  # floor on each dimension's refitted std (TF-Agents' minimum variance 1e-4)

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


# ---- the algorithm: network, CEM, clipped double-Q target, update ----
# PyTorch's nn.Linear weight scale, U(+-1/sqrt(fan_in)), as in the authors' QMLE release (Flax's LeCun normal learned
# walker-walk slower). Biases start at zero, and each half of the split joint layer draws at its own fan-in.
Dense = functools.partial(nn.Dense, kernel_init=nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform"))


class ResidualBlock(nn.Module):  # x + W2 relu(W1 x), the release's form (a pre-activation ReLU learned slower)
    features: int

    @nn.compact
    def __call__(self, x):
        h = Dense(self.features)(x)  # Dense_0, made before Dense_1: the names hold the parameters
        return x + Dense(self.features)(nn.relu(h))


class QNetwork(nn.Module):
    """qmle_dmc.py's Q(s, a) = head(LN-ELU(joint(concat(obs_stream(s), action_stream(a))))) without its predictors.
    The stream, and the observation half of the joint block's first layer, are computed once per state and broadcast
    over that state's candidate actions."""

    action_dim: int

    def setup(self):
        self.obs_embed, self.obs_block, self.obs_norm = Dense(128), ResidualBlock(128), nn.LayerNorm()
        self.act_embed, self.act_norm = Dense(128), nn.LayerNorm()
        self.joint_in_obs, self.joint_in_act = Dense(256), Dense(256, use_bias=False)
        self.joint_out, self.joint_norm, self.q_head = Dense(256), nn.LayerNorm(), Dense(1)

    def __call__(self, obs, actions):
        return self.q_values(self.observation_stream(obs), actions)

    def observation_stream(self, obs):  # [..., obs_dim] -> [..., 128]
        return nn.elu(self.obs_norm(self.obs_block(self.obs_embed(obs))))

    def q_values(self, embedding, actions):  # [..., 128], [..., M, D] -> [..., M]
        a = nn.elu(self.act_norm(self.act_embed(actions)))
        h = self.joint_out(nn.relu(self.joint_in_obs(embedding)[..., None, :] + self.joint_in_act(a)))
        x = jnp.concatenate([jnp.broadcast_to(embedding[..., None, :], a.shape), a], axis=-1)
        return self.q_head(nn.elu(self.joint_norm(x + h)))[..., 0]


class CEM(NamedTuple):  # the cross-entropy method's settings
    samples: int
    elites: int
    iterations: int
    min_std: float


def cem_maximise(q_fn, key, batch: int, dim: int, cem: CEM):
    """Approximate arg-max over [-1, 1]^dim of q_fn ([B, N, D] -> [B, N]) for B states, from N(0, 1) per dimension:
    (the best sample of any iteration [B, D], not the final mean that Q never saw; its Q [B]; the final std [B, D];
    the first iteration's best Q [B])."""

    def refit(samples, values):  # one state: [N, D], [N] -> mean, std, best sample, its value
        top_values, top = jax.lax.top_k(values, cem.elites)
        elites = samples[top]
        return elites.mean(0), jnp.maximum(elites.std(0), cem.min_std), elites[0], top_values[0]

    def iteration(carry, k):
        mean, std, best, best_value = carry
        noise = jax.random.normal(k, (batch, cem.samples, dim))
        samples = jnp.clip(mean[:, None] + std[:, None] * noise, -1.0, 1.0)
        mean, std, top, top_value = jax.vmap(refit)(samples, q_fn(samples))
        better = top_value > best_value
        best, best_value = jnp.where(better[:, None], top, best), jnp.where(better, top_value, best_value)
        return (mean, std, best, best_value), top_value

    start = (jnp.zeros((batch, dim)), jnp.ones((batch, dim)), jnp.zeros((batch, dim)), jnp.full(batch, -jnp.inf))
    (_, std, best, value), top_values = jax.lax.scan(iteration, start, jax.random.split(key, cem.iterations))
    return best, value, std, top_values[0]


@functools.partial(jax.jit, static_argnames=("model", "cem"), donate_argnames=("greedy",))
def act(model: QNetwork, params, obs, key, greedy, epsilon, cem: CEM):
    """CEM's greedy action, or with probability epsilon a uniform one, for N states: the loop's one device call per
    step. Also the next keys, and into `greedy` CEM's final std summed over the greedy actions, and their count."""
    key, k_act, k_update = jax.random.split(key, 3)
    k_cem, k_explore, k_random = jax.random.split(k_act, 3)
    embedding = model.apply(params, obs, method=QNetwork.observation_stream)
    q_fn = lambda a: model.apply(params, embedding, a, method=QNetwork.q_values)
    best, _, std, _ = cem_maximise(q_fn, k_cem, obs.shape[0], model.action_dim, cem)
    random_action = jax.random.uniform(k_random, best.shape, minval=-1.0, maxval=1.0)
    explore = jax.random.uniform(k_explore, obs.shape[:1]) < epsilon
    counts = jnp.stack([jnp.where(explore, 0.0, std.mean(-1)).sum(), (~explore).sum()])
    return jnp.where(explore[:, None], random_action, best), key, k_update, greedy + counts


CHUNK_STATES = 32  # states whose candidates' activations are computed together (q_over_candidates)


def q_over_candidates(model: QNetwork, params, embedding, candidates, states_per_chunk: int = CHUNK_STATES):
    """Q of every candidate of every state, [B, 128], [B, M, D] -> [B, M], a few states at a time: each chunk's
    activations stay in cache between the matmuls (as in qmle_dmc.py, where that halves the time on a CPU)."""
    batch = embedding.shape[0]
    chunk = np.gcd(batch, states_per_chunk)
    chunks = [x.reshape(batch // chunk, chunk, *x.shape[1:]) for x in (embedding, candidates)]
    return jax.lax.map(lambda xs: model.apply(params, *xs, method=QNetwork.q_values), chunks).reshape(batch, -1)


def clipped_double_q(model: QNetwork, target_params, lagged_params, next_obs, key, cem: CEM):
    """QT-Opt's target value min(Q1, Q2)(s', a*), a* CEM's arg-max of the first target network Q1 at s'; and how the
    search and the clipping went."""
    embedding = model.apply(target_params, next_obs, method=QNetwork.observation_stream)
    q_fn = functools.partial(q_over_candidates, model, target_params, embedding)
    argmax, q1, std, first_best = cem_maximise(q_fn, key, next_obs.shape[0], model.action_dim, cem)
    value = jnp.minimum(q1, model.apply(lagged_params, next_obs, argmax[:, None])[:, 0])
    gain, gap = jnp.mean(q1 - first_best), jnp.mean(q1 - value)  # what CEM's later iterations won; what clipping took
    return value, {"cem/target_final_std": std.mean(), "cem/target_gain": gain, "losses/clip_gap": gap}


UpdateConfig = collections.namedtuple(
    "UpdateConfig",
    "cem updates gamma batch_size prioritized_replay priority_exponent importance_exponent priority_epsilon",
)  # the update's settings: one static argument


class QTOptState(TrainState):  # apply_fn unused (None): the model is passed to each jitted function
    target_params: Any  # the first target network: CEM's arg-max is taken under it
    lagged_params: Any  # the second, one copy older than the first


@functools.cache
def adam(learning_rate: float):  # one optimizer per rate, so that a second run in one process compiles nothing
    return optax.adam(learning_rate)


def gradient_step(model: QNetwork, state: QTOptState, buffer, key, cfg: UpdateConfig):
    """QT-Opt's replay step: sample, the clipped double-Q target with CEM, priorities written back, one Adam step on
    the importance-weighted TD loss."""
    k_sample, k_target = jax.random.split(key)
    prioritized = cfg.prioritized_replay
    index, batch, weights = buffer_sample(buffer, k_sample, cfg.batch_size, prioritized, cfg.importance_exponent)
    next_q, metrics = clipped_double_q(
        model, state.target_params, state.lagged_params, batch["next_obs"], k_target, cfg.cem
    )
    td_target = batch["reward"] + cfg.gamma * (1.0 - batch["terminated"]) * next_q

    def loss_fn(params):
        embedding = model.apply(params, batch["obs"], method=QNetwork.observation_stream)
        q = model.apply(params, embedding, batch["action"][:, None], method=QNetwork.q_values)[:, 0]
        td_error = td_target - q
        return jnp.mean(weights * td_error**2), (td_error, q)

    (td_loss, (td_error, q)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    priority = jnp.abs(td_error) + cfg.priority_epsilon if prioritized else None
    buffer = buffer_update(buffer, index, priority, cfg.priority_exponent)
    metrics.update({"losses/td_loss": td_loss, "losses/q_values": q.mean()})
    return state.apply_gradients(grads=grads), buffer, metrics


@functools.partial(jax.jit, static_argnames=("model", "cfg"), donate_argnames=("buffer",))
def update(model: QNetwork, state: QTOptState, buffer, new_transitions, key, cfg: UpdateConfig):
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
    key, greedy, returns = jax.random.PRNGKey(seed), jnp.zeros(2), []
    for episode in range(args.eval_episodes):
        obs, _ = env.reset(seed=seed + episode)
        done = False
        while not done:
            action, key, _, greedy = policy(params, obs[None], key, greedy, 0.0)
            obs, _, terminated, truncated, info = env.step(np.asarray(action[0]))
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
    """A DeepMind Control or Gymnasium task with flat float32 observations and actions in [-1, 1] (CEM's box)."""
    env = checked_env(env_id, video_dir)
    if not isinstance(env.action_space, gym.spaces.Box) or len(env.action_space.shape) != 1:
        fail(f"--env-id {env_id!r} has {env.action_space} actions; {SCRIPT} needs a one-dimensional Box")
    env = gym.wrappers.RecordEpisodeStatistics(gym.wrappers.RescaleAction(env, -1.0, 1.0))
    env.action_space.seed(seed)
    return env


def check_args(args: Args) -> None:
    check_common(args, "target_network_frequency cem_samples cem_elites cem_iterations", "cem_min_std", "")
    if args.cem_elites > args.cem_samples:
        fail(f"--cem-elites must be <= --cem-samples ({args.cem_samples}), got {args.cem_elites}")
    if args.capture_video:  # rendered at each evaluation: refused now, not after the first stretch of training
        checked_env(args.env_id, render=True).close()


def check_searches(args: Args, action_dim: int) -> None:
    """Refuse a CEM search that cannot fit, counting less than XLA allocates: 3 float32 copies of its samples and 4
    of a chunk's 256 hidden units. --load-model only acts, on one state."""
    searches = (("acting", 1),) if args.load_model else (("acting", args.num_envs), ("a target", args.batch_size))
    for what, states in searches:
        need = 12 * states * args.cem_samples * action_dim + 16 * 256 * args.cem_samples * min(states, CHUNK_STATES)
        check_fits(f"--cem-samples {args.cem_samples:,} for {states:,} states of {action_dim} dims ({what})", need)


MODEL_SETTINGS = ("env_id",)  # what a saved model's shapes and meaning depend on, besides the script


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

METRICS = """charts/episodic_return charts/episodic_length charts/SPS losses/td_loss losses/q_values losses/clip_gap
    cem/greedy_final_std cem/target_final_std cem/target_gain eval/episodic_return""".split()  # metrics.csv's columns


def main(args: Args) -> None:
    args, meta, saved = start(args)  # a Ctrl-C from here on stops the run after its current step
    check_args(args)
    env = make_env(args.env_id, args.seed)  # one error line here, not in a worker
    (example_obs, _), action_dim = env.reset(seed=args.seed), env.action_space.shape[0]
    if args.resume and meta["global_step"] >= args.total_timesteps:
        return print(f"{args.resume} is at step {meta['global_step']}: a larger --total-timesteps continues it")
    envs = None if args.load_model else make_envs(args.env_id, args.seed, args.num_envs)  # forked before JAX starts
    check_searches(args, action_dim)
    model, cem = QNetwork(action_dim), CEM(args.cem_samples, args.cem_elites, args.cem_iterations, args.cem_min_std)
    policy = functools.partial(act, model, cem=cem)
    key, k_init = jax.random.split(jax.random.PRNGKey(args.seed))
    params = jax.jit(QNetwork.init, static_argnums=0)(model, k_init, example_obs[None], jnp.zeros((1, 1, action_dim)))
    if args.load_model:  # its run's evaluation seeds and CEM: it scores what its run logged
        video_dir = args.capture_video and os.path.join(os.path.dirname(args.load_model), "videos", "evaluation")
        evaluate(policy, restore(params, saved, "--load-model"), args, f"{args.load_model} on {args.env_id}", video_dir)
        return

    transition = dict(obs=example_obs, next_obs=example_obs, action=np.zeros(action_dim, np.float32))
    transition.update(reward=np.float32(0), terminated=np.float32(0))
    row_bytes = sum(v.nbytes for v in transition.values()) + 16  # and its share of the sum-tree
    check_fits(f"--buffer-size {args.buffer_size}", args.buffer_size * row_bytes)
    rows = math.lcm(args.num_envs, args.train_frequency)  # transitions per update call
    cfg = UpdateConfig(cem, rows // args.train_frequency, *(getattr(args, n) for n in UpdateConfig._fields[2:]))
    cfgs = (cfg._replace(updates=0), cfg)  # before --learning-starts, and after
    logger, global_step = Logger(args, METRICS, meta), meta["global_step"] if meta else 0
    print(f"{logger.run_dir}: {action_dim} action dims; {cem}")
    tx = adam(args.learning_rate)
    state = QTOptState.create(apply_fn=None, params=params, target_params=params, lagged_params=params, tx=tx)
    pending = {k: np.zeros((rows, *np.shape(v)), np.float32) for k, v in transition.items()}
    run = dict(state=jax.tree.map(jnp.asarray, state), key=key, greedy=jnp.zeros(2), pending=pending)
    run.update(buffer=buffer_init(transition, args.buffer_size), envs=dict(envs=np.zeros(0, np.uint8), obs=np.zeros(0)))
    run = restore(run, saved, "--resume") if meta else run
    state, buffer, key, greedy, pending = (run[k] for k in ("state", "buffer", "key", "greedy", "pending"))

    def checkpoint(whole=True):  # the whole run state, environments included, so that --resume continues it
        tree = dict(
            state=state, buffer=buffer, key=key, greedy=greedy, pending=pending, envs=saved_envs(envs, obs, whole)
        )
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
        while global_step < args.total_timesteps and not STOP:
            actions, key, k_update, greedy = policy(state.params, obs, key, greedy, args.epsilon)
            actions = np.asarray(actions)  # the step's one transfer from the device
            next_obs, rewards, terminated, truncated, infos = envs.step(actions)
            final_obs = next_obs.copy()  # where an episode ended: its own last observation, not the next one's first
            for i in np.flatnonzero(terminated | truncated):  # a time limit is no termination: targets bootstrap
                final_obs[i], episode = infos["final_obs"][i], infos["final_info"]["episode"]
                stats = {"charts/episodic_return": episode["r"][i], "charts/episodic_length": episode["l"][i]}
                logger.log(global_step + args.num_envs, stats)
                returns.append(float(episode["r"][i]))
            new = dict(obs=obs, action=actions, reward=rewards, next_obs=final_obs, terminated=terminated)
            for k, v in new.items():
                pending[k][global_step % rows : global_step % rows + args.num_envs] = v
            obs, previous, global_step = next_obs, global_step, global_step + args.num_envs
            if global_step % rows == 0:  # store the period's transitions, then learn from the buffer
                learn = global_step >= args.learning_starts
                if learn and not metrics:
                    print(f"step {global_step}: compiling the update ...")
                chunk = {k: v.copy() for k, v in pending.items()}  # jax may read numpy inputs after returning
                state, buffer, metrics = update(model, state, buffer, chunk, k_update, cfgs[learn])
            if crossed(args.target_network_frequency):  # the first target hands its parameters to the second
                state = state.replace(lagged_params=state.target_params, target_params=state.params)
            if crossed(args.log_frequency):
                now, (std_sum, greedy_steps) = time.time(), np.asarray(greedy, np.float64)  # greedy steps only
                sps = (global_step - last_log[1]) / (now - last_log[0])
                acting = {"cem/greedy_final_std": std_sum / greedy_steps} if greedy_steps else {}
                logger.log(global_step, {"charts/SPS": sps, **acting, **metrics})
                eta = time.strftime("%H:%M:%S", time.gmtime((args.total_timesteps - global_step) / sps))
                print(f"step {global_step:>8}  return {np.mean(returns or np.nan):8.1f}  SPS {sps:4.0f}  ETA {eta}")
                greedy, last_log, returns = jnp.zeros(2), (now, global_step), []
            if crossed(args.checkpoint_frequency) and global_step < args.total_timesteps:
                checkpoint()
            if crossed(args.eval_frequency) and global_step < args.total_timesteps:
                evaluation()
        outcome = "interrupted" if STOP else "finished"
    finally:  # a crash's traceback follows, after the model and the checkpoint are saved
        finish(args, outcome, global_step, state.params, logger, envs, evaluation, checkpoint)
    if STOP:
        sys.exit(128 + STOP[0])


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `--help | head -1` ends quietly, as other commands do
    parsed = tyro.cli(Args)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    main(parsed)
