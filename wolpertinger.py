"""Wolpertinger: DDPG in a large discrete action space, with a k-nearest-neighbour lookup and critic refinement.

Every action has an embedding in [-1, 1]^D: a point of a grid of about --max-actions actions over a continuous task's
actions, or linspace(-1, 1, n) for a Discrete(n) task. A DDPG actor's proto-action (plus Gaussian noise while training)
selects the k actions nearest to it, and the critic Q(s, embedding) picks the best of them; training is DDPG on the
embeddings of the actions taken. Dulac-Arnold et al., "Deep Reinforcement Learning in Large Discrete Action Spaces",
2015 (arXiv 1512.07679); docs/wolpertinger.md.

    python wolpertinger.py --env-id Pendulum-v1 --max-actions 200000   # the headline: 200,000 actions, k = 20,000
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
from typing import Any, Literal, NamedTuple, Optional

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
    env_id: str = "Pendulum-v1"  # Gymnasium id (Box actions on a grid, Discrete ones as they are) or DMC `domain-task`
    total_timesteps: int = 50_000  # environment steps to train for
    learning_rate: float = 3e-4  # Adam step size of the actor and of the critic (CleanRL DDPG)
    buffer_size: int = 1_000_000  # replay memory capacity in transitions
    gamma: float = 0.99  # discount factor
    tau: float = 0.005  # soft target update rate: target <- tau * online + (1 - tau) * target
    batch_size: int = 256  # transitions per update
    learning_starts: int = 5000  # environment steps of uniformly random actions before the first update
    train_frequency: int = 1  # environment steps between updates (DDPG: every step)
    policy_frequency: int = 2  # updates between actor steps (and soft target updates), as in CleanRL's DDPG
    exploration_noise: float = 0.1  # std of the Gaussian noise on the proto-action while training
    epsilon: float = 0.0  # probability of a uniform pick among the k neighbours instead of the critic's
    end_epsilon: float = 0.0  # the value --epsilon falls to, linearly (CleanRL DQN's schedule)
    exploration_fraction: float = 0.5  # the share of --total-timesteps over which --epsilon falls to --end-epsilon
    prioritized_replay: bool = False  # proportional prioritised replay (off: DDPG's uniform replay)
    priority_exponent: float = 0.6  # alpha: how strongly priorities skew sampling
    importance_exponent: float = 0.2  # beta: strength of the importance-sampling correction
    priority_epsilon: float = 1e-6  # added to |TD error|, so that no transition has zero priority
    max_actions: int = 200_000  # a Box task's grid: round(max_actions ** (1 / D)) bins per dimension (Discrete: unused)
    k_ratio: float = 0.1  # k, the neighbours the critic chooses among, as a share in (0, 1] of the actions
    k: Optional[int] = None  # k itself, instead of --k-ratio
    knn: Literal["exact", "approx"] = "exact"  # k-NN: all distances and top_k, or approx_max_k (approximate on TPU)
    recall_target: float = 0.95  # expected recall of --knn approx
    knn_in_target: bool = False  # target: the target critic's best of the k nearest to mu'(s') (paper), not Q'(s', mu')

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


# ---- the algorithm: networks, action table, k-NN, acting, update ----
class Actor(nn.Module):  # mu(s): the proto-action, a point of the embedding box (CleanRL DDPG's 256-256 MLP)
    embedding_dim: int

    @nn.compact
    def __call__(self, obs):
        x = nn.relu(nn.Dense(256)(obs))
        x = nn.relu(nn.Dense(256)(x))
        return nn.tanh(nn.Dense(self.embedding_dim)(x))


class Critic(nn.Module):
    """Q(s, e): obs [..., O], embeddings [..., M, D] -> [..., M]. CleanRL DDPG's MLP on concat(s, e), its first layer
    split into its observation and action halves (the same map): the first is computed once per state."""

    @nn.compact
    def __call__(self, obs, embeddings):
        h = nn.Dense(256, name="obs_in")(obs)[..., None, :] + nn.Dense(256, use_bias=False, name="act_in")(embeddings)
        h = nn.relu(nn.Dense(256, name="hidden")(nn.relu(h)))
        return nn.Dense(1, name="out")(h)[..., 0]


def grid_bins(max_actions: int, dim: int) -> int:
    return int(round(max_actions ** (1.0 / dim)))


def action_table(space: gym.spaces.Space, max_actions: int) -> np.ndarray:
    """Every action's embedding, [N, D] float32: linspace(-1, 1, n) for Discrete(n), else the grid of grid_bins values
    per dimension in C order (action i is at the bins np.unravel_index(i, (bins,) * D))."""
    if isinstance(space, gym.spaces.Discrete):
        return np.linspace(-1.0, 1.0, int(space.n), dtype=np.float32)[:, None]
    dim = space.shape[0]
    values = np.linspace(-1.0, 1.0, grid_bins(max_actions, dim), dtype=np.float32)
    return np.stack(np.meshgrid(*[values] * dim, indexing="ij", copy=False), -1).reshape(-1, dim)  # views until here


def env_action(space: gym.spaces.Space, table: np.ndarray, index):  # index (Discrete), or its grid point (Box)
    return space.start + np.asarray(index) if isinstance(space, gym.spaces.Discrete) else table[index]


def neighbour_count(args, num_actions: int) -> int:  # k: --k, or --k-ratio of the actions (at least one)
    return args.k if args.k is not None else max(1, round(args.k_ratio * num_actions))


@functools.partial(jax.jit, static_argnames=("k", "approx", "recall_target"))
def nearest_actions(table, queries, k: int, approx: bool = False, recall_target: float = 0.95):
    """Indices [B, k] of the rows of `table` [N, D] nearest to each of `queries` [B, D]: all N squared distances (of
    differences, so that close neighbours on a fine grid keep their order), then top_k (nearest first), or
    approx_max_k, which XLA approximates on TPU only (about recall_target of the true neighbours)."""
    scores = -jnp.sum((queries[:, None, :] - table[None]) ** 2, axis=-1)
    if approx:
        return jax.lax.approx_max_k(scores, k, recall_target=recall_target)[1]
    return jax.lax.top_k(scores, k)[1]


class Networks(NamedTuple):  # the two flax modules and the k-NN's settings: static under jit
    actor: Actor
    critic: Critic
    k: int
    approx: bool = False
    recall_target: float = 0.95


def refine(nets: Networks, critic_params, table, obs, proto):
    """Wolpertinger's policy for one state: obs [O], proto-action [D] -> (k neighbours [k], their Q [k])."""
    neighbours = nearest_actions(table, proto[None], nets.k, nets.approx, nets.recall_target)[0]
    return neighbours, nets.critic.apply(critic_params, obs, table[neighbours])


@functools.partial(jax.jit, static_argnames=("nets",), donate_argnames=("counts",))
def act(nets: Networks, table, params, obs, key, counts, noise_std, epsilon):
    """The loop's one device call per step, for N states: proto-action + N(0, noise_std), its k nearest actions, the
    critic's best of them (with probability epsilon a uniform one of them). Also the next keys, and counts [the pick is
    not the action nearest the noisy proto-action, steps] summed on the device."""
    key, k_act, k_update = jax.random.split(key, 3)
    k_noise, k_explore, k_random = jax.random.split(k_act, 3)
    proto = nets.actor.apply(params["actor"], obs)
    proto = jnp.clip(proto + noise_std * jax.random.normal(k_noise, proto.shape), -1.0, 1.0)
    explore = jax.random.uniform(k_explore, proto.shape[:1]) < epsilon
    random_pick = jax.random.randint(k_random, proto.shape[:1], 0, nets.k)

    def choose(obs, proto, explore, random_pick):  # one state
        neighbours, q = refine(nets, params["critic"], table, obs, proto)
        # The nearest is found from the distances, not assumed to be first: approx_max_k need not sort.
        nearest = neighbours[jnp.argmin(jnp.sum((table[neighbours] - proto) ** 2, axis=-1))]
        return jnp.where(explore, neighbours[random_pick], neighbours[q.argmax()]), nearest

    index, nearest = jax.vmap(choose)(obs, proto, explore, random_pick)
    return index, key, k_update, counts + jnp.array([jnp.sum(index != nearest), index.shape[0]], counts.dtype)


@jax.jit
def advance_key(key, steps):
    """The loop key after `steps` splits as act makes them, and the last one's update key: the random steps before
    --learning-starts make no device call and catch up here, so that the keys do not depend on them."""
    return jax.lax.fori_loop(0, steps, lambda _, keys: tuple(jax.random.split(keys[0], 3)[::2]), (key, key))


def exploration_epsilon(args, step: int) -> float:  # at step `step` (1: the first): linear to --end-epsilon, then flat
    decayed = min(1.0, step / max(1.0, args.exploration_fraction * args.total_timesteps))
    return args.epsilon + decayed * (args.end_epsilon - args.epsilon)


UpdateConfig = collections.namedtuple(
    "UpdateConfig",
    """updates policy_frequency gamma tau batch_size prioritized_replay priority_exponent importance_exponent
    priority_epsilon knn_in_target""",
)  # the update's settings: one static argument
KNN_TARGET_ROWS = 65536  # --knn-in-target searches max(1, this // k) states at a time: about this many critic rows


class DDPGState(TrainState):  # apply_fn unused (None): the networks are passed to each jitted function
    target_params: Any


@functools.cache
def adam(learning_rate: float):  # one optimizer per rate, so that a second run in one process compiles nothing
    return optax.adam(learning_rate)


def target_value(nets: Networks, states: dict, table, next_obs, knn_in_target: bool):
    """DDPG's Q'(s', mu'(s')), or (knn_in_target, the paper's) the target critic's best of the k actions nearest to
    mu'(s'), a few states at a time so that the [states, k, 256] activations stay near KNN_TARGET_ROWS rows."""
    next_proto, params = nets.actor.apply(states["actor"].target_params, next_obs), states["critic"].target_params
    if not knn_in_target:
        return nets.critic.apply(params, next_obs, next_proto[:, None])[:, 0]
    best_q = lambda xs: refine(nets, params, table, *xs)[1].max()
    return jax.lax.map(best_q, (next_obs, next_proto), batch_size=max(1, KNN_TARGET_ROWS // nets.k))


def gradient_step(nets: Networks, states: dict, buffer, table, key, update_actor, cfg: UpdateConfig):
    """One DDPG update: the critic's step on the (importance-weighted) TD loss, priorities written back, and when
    update_actor the actor's deterministic policy gradient through the new critic and soft updates of both targets.
    update_actor: a Python bool, or traced in a scan (the actor's loss is then NaN on the off-steps)."""
    index, batch, weights = buffer_sample(buffer, key, cfg.batch_size, cfg.prioritized_replay, cfg.importance_exponent)
    next_q = target_value(nets, states, table, batch["next_obs"], cfg.knn_in_target)
    td_target = batch["reward"] + cfg.gamma * (1.0 - batch["terminated"]) * next_q

    def critic_loss(params):
        q = nets.critic.apply(params, batch["obs"], batch["action"][:, None])[:, 0]
        td_error = td_target - q
        return jnp.mean(weights * td_error**2), (td_error, q)

    (qf_loss, (td_error, q)), grads = jax.value_and_grad(critic_loss, has_aux=True)(states["critic"].params)
    states = dict(states, critic=states["critic"].apply_gradients(grads=grads))
    priority = jnp.abs(td_error) + cfg.priority_epsilon if cfg.prioritized_replay else None
    buffer = buffer_update(buffer, index, priority, cfg.priority_exponent)
    metrics = {"losses/qf_loss": qf_loss, "losses/qf_values": q.mean()}

    def actor_step(states):
        def actor_loss(params):  # a plain average over the replayed states: no importance weights here
            proto = nets.actor.apply(params, batch["obs"])
            return -nets.critic.apply(states["critic"].params, batch["obs"], proto[:, None]).mean()

        loss, grads = jax.value_and_grad(actor_loss)(states["actor"].params)
        states = dict(states, actor=states["actor"].apply_gradients(grads=grads))
        soft = lambda s: s.replace(target_params=optax.incremental_update(s.params, s.target_params, cfg.tau))
        return {name: soft(s) for name, s in states.items()}, loss

    if not isinstance(update_actor, bool):  # traced, in a scan: the actor's loss is NaN on the off-steps
        skip = lambda states: (states, jnp.float32(jnp.nan))
        states, metrics["losses/actor_loss"] = jax.lax.cond(update_actor, actor_step, skip, states)
    elif update_actor:  # a Python bool: the off-steps compile without the actor
        states, metrics["losses/actor_loss"] = actor_step(states)
    return states, buffer, metrics


@functools.partial(jax.jit, static_argnames=("nets", "cfg", "phase"), donate_argnames=("buffer",))
def update(nets: Networks, states: dict, buffer, new_transitions, table, key, cfg: UpdateConfig, phase: int = 0):
    """The loop's device call per replay period: store the transitions gathered since the last one, then take
    cfg.updates gradient steps (none before --learning-starts). The i-th steps the actor when (phase + i) %
    policy_frequency == 0, phase being the run's update count so far modulo policy_frequency."""
    buffer = buffer_add(buffer, new_transitions)
    actor_turns = [(phase + i) % cfg.policy_frequency == 0 for i in range(cfg.updates)]
    if cfg.updates == 0:
        return states, buffer, {}
    if cfg.updates == 1:  # the key itself: one environment reproduces its single-environment run
        return gradient_step(nets, states, buffer, table, key, actor_turns[0], cfg)
    step = lambda carry, xs: (lambda s, b, m: ((s, b), m))(*gradient_step(nets, *carry, table, *xs, cfg))
    xs = (jax.random.split(key, cfg.updates), jnp.array(actor_turns))
    (states, buffer), metrics = jax.lax.scan(step, (states, buffer), xs)
    last = {name: m[-1] for name, m in metrics.items() if name != "losses/actor_loss"}
    if any(actor_turns):  # the actor's loss at its last step, as a single update reports it
        last["losses/actor_loss"] = metrics["losses/actor_loss"][max(i for i, on in enumerate(actor_turns) if on)]
    return states, buffer, last


def evaluate(policy, params, table: np.ndarray, args, label: str, video_dir: Optional[str] = None) -> float:
    """Mean greedy return (no noise, no epsilon) over --eval-episodes episodes of a fresh environment reset with seeds
    --seed + 10000, + 10001, ..., printed after `label` (--load-model thus scores a model as its run did)."""
    seed, env = args.seed + 10_000, make_env(args.env_id, args.seed + 10_000, video_dir)
    key, counts, returns = jax.random.PRNGKey(seed), jnp.zeros(2, jnp.int32), []
    for episode in range(args.eval_episodes):
        obs, _ = env.reset(seed=seed + episode)
        done = False
        while not done:
            index, key, _, counts = policy(params, obs[None], key, counts, 0.0, 0.0)
            obs, _, terminated, truncated, info = env.step(env_action(env.action_space, table, np.asarray(index))[0])
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
    """A DeepMind Control or Gymnasium task with flat float32 observations; Box actions rescaled to [-1, 1]."""
    env = checked_env(env_id, video_dir)
    box = isinstance(env.action_space, gym.spaces.Box) and len(env.action_space.shape) == 1
    if not (box or isinstance(env.action_space, gym.spaces.Discrete)):
        fail(f"--env-id {env_id!r} has {env.action_space} actions; {SCRIPT} needs a one-dimensional Box or a Discrete")
    env = gym.wrappers.RecordEpisodeStatistics(gym.wrappers.RescaleAction(env, -1.0, 1.0) if box else env)
    env.action_space.seed(seed)
    return env


def check_args(args: Args) -> None:
    fractions = "tau end_epsilon exploration_fraction recall_target k_ratio"
    check_common(args, "policy_frequency max_actions k_ratio", "exploration_noise", fractions)
    if args.k is not None and args.k < 1:
        fail(f"--k must be > 0, got {args.k}")
    if args.recall_target == 0 and args.knn == "approx":  # XLA's approx_max_k takes (0, 1]
        fail("--recall-target must be > 0 with --knn approx, got 0")


def check_actions(args: Args, space: gym.spaces.Space) -> None:
    """Refuse, before the table is built, a k over the number of actions or a table that does not fit in memory; warn
    of one that makes every step slow (past the Pendulum headline's k, or ten times its table)."""
    dim = 1 if isinstance(space, gym.spaces.Discrete) else space.shape[0]

    def nbytes(n):  # at once: the [N, D] table, or per device call the distances to every action and the critic's
        k = min(neighbour_count(args, n), n)  # two hidden layers over the k neighbours, for each state searched
        states = max(args.num_envs, min(args.batch_size, max(1, KNN_TARGET_ROWS // k)) if args.knn_in_target else 1)
        return 4 * max(n * dim, states * (n + 2 * 256 * k))

    n = int(space.n) if isinstance(space, gym.spaces.Discrete) else grid_bins(args.max_actions, dim) ** dim
    if isinstance(space, gym.spaces.Box):
        alternatives = "qmle_dmc.py and aql_discrete.py sample actions instead"
        check_fits(f"{dim} action dimensions, even at 2 bins each ({alternatives})", nbytes(2**dim))
        if n < 2**dim:
            fail(f"--max-actions must be >= {2**dim} for 2 bins in each of {dim} dimensions, got {args.max_actions}")
    k = neighbour_count(args, n)
    if k > n:
        fail(f"--k must be <= the number of actions ({n}), got {k}")
    flag = " (--max-actions)" if isinstance(space, gym.spaces.Box) else ""
    check_fits(f"a table of {n:,} actions{flag} with k = {k:,}", nbytes(n))
    if k > 20_000 or n * dim > 2_000_000:
        print(f"warning: {n:,} actions of {dim} dimensions and k = {k:,} make every step slow", file=sys.stderr)


MODEL_SETTINGS = ("env_id", "max_actions", "k", "k_ratio")  # the task, the grid and k: what a saved model acts on


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


METRICS = """charts/episodic_return charts/episodic_length charts/SPS charts/refine_changed losses/qf_loss
    losses/actor_loss losses/qf_values eval/episodic_return""".split()  # metrics.csv's columns, in this order


def main(args: Args) -> None:
    started, stop = time.time(), STOP
    args, meta, saved = start(args)  # a Ctrl-C from here on stops the run after its current step
    check_args(args)
    env = make_env(args.env_id, args.seed)  # one error line here, not in a worker
    (example_obs, _), space = env.reset(seed=args.seed), env.action_space
    if args.capture_video:
        checked_env(args.env_id, render=True).close()
    if args.resume and meta["global_step"] >= args.total_timesteps:
        return print(f"{args.resume} is at step {meta['global_step']}: a larger --total-timesteps continues it")
    envs = None if args.load_model else make_envs(args.env_id, args.seed, args.num_envs)  # forked before JAX starts
    check_actions(args, space)  # before the table is built
    table_np = action_table(space, args.max_actions)  # the host's copy gives the environments their actions
    (num_actions, dim), table = table_np.shape, jnp.asarray(table_np)
    nets = Networks(Actor(dim), Critic(), neighbour_count(args, num_actions), args.knn == "approx", args.recall_target)
    policy = functools.partial(act, nets, table)
    key, k_actor, k_critic = jax.random.split(jax.random.PRNGKey(args.seed), 3)
    init = jax.jit(nn.Module.init, static_argnums=0)  # keyed on the modules' settings: a second run reuses it
    params = dict(actor=init(nets.actor, k_actor, example_obs[None]))
    params["critic"] = init(nets.critic, k_critic, example_obs[None], table[None, :1])
    if args.load_model:  # its run's task, grid, k and evaluation seeds: it scores what its run logged
        video_dir = args.capture_video and os.path.join(os.path.dirname(args.load_model), "videos", "evaluation")
        label = f"{args.load_model} on {args.env_id}"
        return evaluate(policy, restore(params, saved, "--load-model"), table_np, args, label, video_dir)

    transition = dict(obs=example_obs, next_obs=example_obs, action=table_np[0])  # action: the action's embedding
    transition.update(reward=np.float32(0), terminated=np.float32(0))
    row_bytes = sum(v.nbytes for v in transition.values()) + 16  # and its share of the sum-tree
    check_fits(f"--buffer-size {args.buffer_size}", args.buffer_size * row_bytes)
    rows = math.lcm(args.num_envs, args.train_frequency)  # transitions per update call
    cfg = UpdateConfig(rows // args.train_frequency, *(getattr(args, name) for name in UpdateConfig._fields[1:]))
    cfgs = (cfg._replace(updates=0), cfg)  # before --learning-starts, and after
    logger, global_step = Logger(args, METRICS, meta), meta["global_step"] if meta else 0
    print(f"{logger.run_dir}: {num_actions} actions in {dim} embedding dims, k = {nets.k} ({args.knn} k-NN)")
    create = lambda p: DDPGState.create(apply_fn=None, params=p, target_params=p, tx=adam(args.learning_rate))
    states = {name: create(p) for name, p in params.items()}
    pending = {name: np.zeros((rows, *np.shape(v)), np.float32) for name, v in transition.items()}
    run = dict(states=jax.tree.map(jnp.asarray, states), key=key, counts=jnp.zeros(2, jnp.int32), pending=pending)
    run.update(buffer=buffer_init(transition, args.buffer_size), envs=dict(envs=np.zeros(0, np.uint8), obs=np.zeros(0)))
    rng = np.random.default_rng(args.seed)  # the uniformly random actions before --learning-starts
    if meta:
        run, rng.bit_generator.state = restore(run, saved, "--resume"), meta["rng"]
    states, buffer, key, counts, pending = (run[name] for name in ("states", "buffer", "key", "counts", "pending"))
    params = {name: s.params for name, s in states.items()}  # what acts, is evaluated and is saved

    def checkpoint(whole=True):  # the whole run state, environments included, so that --resume continues it
        tree = dict(states=states, buffer=buffer, key=key, counts=counts, pending=pending)
        tree["envs"] = saved_envs(envs, obs, whole)
        info = dict(args=vars(args), global_step=global_step, rng=rng.bit_generator.state)
        info["wandb_id"] = logger.wandb and logger.wandb.id
        return save_arrays(os.path.join(logger.run_dir, "checkpoint.npz"), tree, info)

    def evaluation():  # logged at this step; videos into videos/step{N}
        video_dir = args.capture_video and f"{logger.run_dir}/videos/step{global_step}"
        mean = evaluate(policy, params, table_np, args, f"step {global_step:>8}", video_dir)
        logger.log(global_step, {"eval/episodic_return": mean})

    crossed = lambda period: period > 0 and global_step // period > previous // period  # passed a multiple of it?
    obs = continued_envs(envs, run["envs"], args.seed)
    outcome, metrics, returns, last_log, k_update = "crashed", {}, [], (time.time(), global_step), key
    try:
        while global_step < args.total_timesteps and not stop:
            if global_step < args.learning_starts:  # uniformly random actions from the host: no device call
                indices = rng.integers(num_actions, size=args.num_envs)
                if global_step + args.num_envs >= args.learning_starts:  # the last of them: the keys catch up
                    key, k_update = advance_key(key, global_step // args.num_envs + 1)
                    print(f"step {global_step + args.num_envs}: compiling the greedy action (XLA) ...")
            else:
                epsilon = exploration_epsilon(args, global_step + 1)
                indices, key, k_update, counts = policy(params, obs, key, counts, args.exploration_noise, epsilon)
                indices = np.asarray(indices)  # the step's one transfer from the device
            next_obs, rewards, terminated, truncated, infos = envs.step(env_action(space, table_np, indices))
            final_obs = next_obs.copy()  # where an episode ended: its own last observation, not the next one's first
            for i in np.flatnonzero(terminated | truncated):  # a time limit is no termination: targets bootstrap
                final_obs[i], episode = infos["final_obs"][i], infos["final_info"]["episode"]
                stats = {"charts/episodic_return": episode["r"][i], "charts/episodic_length": episode["l"][i]}
                logger.log(global_step + args.num_envs, stats)
                returns.append(float(episode["r"][i]))
            new = dict(obs=obs, action=table_np[indices], reward=rewards, next_obs=final_obs, terminated=terminated)
            for name, v in new.items():
                pending[name][global_step % rows : global_step % rows + args.num_envs] = v
            obs, previous, global_step = next_obs, global_step, global_step + args.num_envs
            if global_step % rows == 0:  # store the period's transitions, then learn from the buffer
                learn = global_step >= args.learning_starts
                if learn and not metrics:
                    print(f"step {global_step}: compiling the update ...")
                chunk = {name: v.copy() for name, v in pending.items()}  # jax may read numpy inputs after returning
                phase = int(states["critic"].step) % args.policy_frequency  # the critic steps at every update
                states, buffer, new = update(nets, states, buffer, chunk, table, k_update, cfgs[learn], phase)
                params = {name: s.params for name, s in states.items()}
                metrics = {**metrics, **new}  # actor_loss: from its last step
            if crossed(args.log_frequency):
                now, (changed, acted) = time.time(), np.asarray(counts)
                sps = (global_step - last_log[1]) / (now - last_log[0])
                refined = {"charts/refine_changed": changed / acted} if acted else {}
                logger.log(global_step, {"charts/SPS": sps, **refined, **metrics})
                eta = time.strftime("%H:%M:%S", time.gmtime((args.total_timesteps - global_step) / sps))
                mean, seconds = np.mean(returns or np.nan), now - started
                print(f"step {global_step:>8}  return {mean:8.1f}  SPS {sps:4.0f}  ETA {eta}  ({seconds:.0f} s so far)")
                counts, last_log, returns = jnp.zeros(2, jnp.int32), (now, global_step), []
            if crossed(args.checkpoint_frequency) and global_step < args.total_timesteps:
                checkpoint()
            if crossed(args.eval_frequency) and global_step < args.total_timesteps:
                evaluation()
        outcome = "interrupted" if stop else "finished"
    finally:  # a crash's traceback follows, after the model and the checkpoint are saved
        finish(args, outcome, global_step, params, logger, envs, evaluation, checkpoint)
    if stop:
        sys.exit(128 + stop[0])


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `--help | head -1` ends quietly, as other commands do
    parsed = tyro.cli(Args)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    main(parsed)
