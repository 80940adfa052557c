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

import functools
import os

os.environ.setdefault("MUJOCO_GL", "egl")  # render offscreen; must be set before dm_control is imported
import time
import warnings
from dataclasses import dataclass
from typing import Any, NamedTuple, Optional

import flax
import flax.linen as nn
import gymnasium as gym
import jax
import jax.numpy as jnp
import numpy as np
import optax
import shimmy  # noqa: F401  (importing it registers the dm_control/* Gymnasium ids)
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
    """record videos of the evaluation episodes to runs/{run_name}/videos (renders offscreen with EGL)"""
    save_model: bool = False
    """save the parameters to runs/{run_name}/wolpertinger.flax at the end"""
    load_model: Optional[str] = None
    """path of a saved model: evaluate it greedily for --eval-episodes episodes instead of training"""

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
    (at least 2), so bins ** D actions; ignored for Discrete action spaces"""
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

    eval_frequency: int = 10_000
    """environment steps between greedy evaluations (0 = never)"""
    eval_episodes: int = 1
    """episodes per greedy evaluation"""
    log_frequency: int = 1000
    """environment steps between console and metrics lines"""


def check_args(args: Args) -> None:
    """Reject settings that would crash later or silently train something else."""
    at_least = dict(total_timesteps=1, batch_size=1, buffer_size=1, train_frequency=1, policy_frequency=1,
                    max_actions=1, eval_episodes=1, log_frequency=1)
    at_least_zero = dict(learning_starts=0, eval_frequency=0, exploration_noise=0.0, priority_epsilon=0.0,
                         priority_exponent=0.0, importance_exponent=0.0)
    for name, low in {**at_least, **at_least_zero}.items():
        if getattr(args, name) < low:
            fail(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}")
    for name in ("gamma", "tau", "epsilon", "end_epsilon", "exploration_fraction", "recall_target"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            fail(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(args, name)}")
    if not 0.0 < args.k_ratio <= 1.0:
        fail(f"--k-ratio must be in (0, 1], got {args.k_ratio}")
    if args.k is not None and args.k < 1:
        fail(f"--k must be >= 1, got {args.k}")
    if args.knn not in ("exact", "approx"):
        fail(f"--knn must be exact or approx, got {args.knn!r}")
    if args.load_model is not None and not os.path.isfile(args.load_model):
        fail(f"--load-model: no such file: {args.load_model}")


def fail(message: str) -> None:
    raise SystemExit(f"error: {message}")


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
    env = gym.make(gym_id, render_mode="rgb_array" if render else None)
    if not isinstance(env.action_space, (gym.spaces.Box, gym.spaces.Discrete)):
        fail(f"--env-id {env_id!r} has {type(env.action_space).__name__} actions; wolpertinger.py needs Box or "
             "Discrete")
    env = gym.wrappers.FlattenObservation(env)
    env = gym.wrappers.DtypeObservation(env, np.float32)
    if isinstance(env.action_space, gym.spaces.Box):
        env = gym.wrappers.RescaleAction(env, -1.0, 1.0)  # the grid lives in [-1, 1]^D; the env sees its bounds
    env = gym.wrappers.RecordEpisodeStatistics(env)
    env.action_space.seed(seed)
    return env


def action_table(space: gym.spaces.Space, max_actions: int) -> np.ndarray:
    """The embeddings of all discrete actions, [N, D] float32 in [-1, 1]; row i is action i.

    Box (already rescaled to [-1, 1]^D): the grid of `bins` evenly spaced values per dimension, bins =
    round(max_actions ** (1/D)), rows in C order (the last dimension varies fastest), so action i has the
    per-dimension bin indices np.unravel_index(i, (bins,) * D). Discrete(n): linspace(-1, 1, n) as [n, 1].
    """
    if isinstance(space, gym.spaces.Discrete):
        return np.linspace(-1.0, 1.0, int(space.n), dtype=np.float32)[:, None]
    dim = int(np.prod(space.shape))
    bins = int(round(max_actions ** (1.0 / dim)))
    if bins < 2:
        fail(f"--max-actions {max_actions} gives fewer than 2 bins per dimension for {dim} action dimensions; "
             f"use at least {int(np.ceil(1.5 ** dim))}")
    values = np.linspace(-1.0, 1.0, bins, dtype=np.float32)
    return np.stack(np.meshgrid(*[values] * dim, indexing="ij"), -1).reshape(-1, dim)


def env_action(space: gym.spaces.Space, table: np.ndarray, index: int):
    """What the environment is given for action `index`: the index itself, or its grid point."""
    return int(index) if isinstance(space, gym.spaces.Discrete) else table[index]


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


def buffer_sample(buffer: ReplayBuffer, key: jax.Array, batch_size: int, prioritized: bool, beta: float):
    """Returns (indices, transitions, importance weights normalised to max 1 within the batch).

    Proportional sampling is stratified: one draw from each of `batch_size` equal slices of the total.
    """
    if not prioritized:
        index = jax.random.randint(key, (batch_size,), 0, buffer.size)
        return index, jax.tree.map(lambda s: s[index], buffer.storage), jnp.ones(batch_size, jnp.float32)
    leaves = buffer.tree.shape[0] // 2
    total = buffer.tree[1]
    target = (jnp.arange(batch_size) + jax.random.uniform(key, (batch_size,))) * (total / batch_size)
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
    """Act in one state: proto-action + N(0, noise_std), its k nearest actions, the critic's best of them
    (or, with prob. epsilon, a uniform one of them).

    Returns (chosen action index, index of the action nearest to the noisy proto-action)."""
    k_noise, k_explore, k_random = jax.random.split(key, 3)
    proto = nets.actor.apply(params["actor"], obs[None])[0]
    proto = jnp.clip(proto + noise_std * jax.random.normal(k_noise, proto.shape), -1.0, 1.0)
    neighbours, q = refine(nets.critic, params["critic"], table, obs, proto, nets.k, nets.approx, nets.recall_target)
    # The nearest is found from the distances, not assumed to be first: approx_max_k need not sort.
    nearest = neighbours[jnp.argmin(jnp.sum((table[neighbours] - proto) ** 2, axis=-1))]
    explore = jax.random.uniform(k_explore) < epsilon
    return jnp.where(explore, neighbours[jax.random.randint(k_random, (), 0, nets.k)], neighbours[q.argmax()]), nearest


class DDPGState(TrainState):
    target_params: Any


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
    return jax.lax.map(best_q, (next_obs, next_proto), batch_size=max(1, 65536 // nets.k))


@functools.partial(jax.jit, static_argnames=("nets", "batch_size", "prioritized", "alpha", "beta",
                                             "priority_epsilon", "update_actor", "knn_in_target"),
                   donate_argnames=("buffer",))
def update(nets: Networks, actor_state: DDPGState, critic_state: DDPGState, buffer: ReplayBuffer, new_transitions,
           table, key, *, gamma: float, tau: float, batch_size: int, prioritized: bool, alpha: float, beta: float,
           priority_epsilon: float, update_actor: bool, knn_in_target: bool = False):
    """One DDPG update as a single device call: store the steps taken since the last call, sample, compute
    the TD target, step the critic, write priorities back, and (when update_actor) step the actor by the
    deterministic policy gradient through the updated critic and soft-update both targets.
    """
    buffer = buffer_add(buffer, new_transitions)
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
    if update_actor:
        def actor_loss(params):  # a plain average over the replayed states: no importance weights here
            proto = nets.actor.apply(params, batch["obs"])
            return -nets.critic.apply(critic_state.params, batch["obs"], proto[:, None]).mean()

        metrics["losses/actor_loss"], grads = jax.value_and_grad(actor_loss)(actor_state.params)
        actor_state = actor_state.apply_gradients(grads=grads)
        soft = lambda s: s.replace(target_params=optax.incremental_update(s.params, s.target_params, tau))  # noqa: E731
        actor_state, critic_state = soft(actor_state), soft(critic_state)
    return actor_state, critic_state, buffer, metrics


def evaluate(nets: Networks, params, table, env_id: str, seed: int, episodes: int,
             video_dir: Optional[str] = None) -> list:
    """Greedy returns (no noise, no epsilon: the critic's best of the k nearest) on a fresh environment."""
    env = make_env(env_id, seed, render=video_dir is not None)
    if video_dir is not None:
        env = gym.wrappers.RecordVideo(env, video_dir, episode_trigger=lambda _: True, disable_logger=True)
    key, returns, table_np = jax.random.PRNGKey(seed), [], np.asarray(table)
    for episode in range(episodes):
        obs, _ = env.reset(seed=seed + episode)
        done = False
        while not done:
            key, k_act = jax.random.split(key)
            index, _ = select_action(nets, params, table, obs, k_act, 0.0, 0.0)
            obs, _, terminated, truncated, info = env.step(env_action(env.action_space, table_np, int(index)))
            done = terminated or truncated
        returns.append(float(info["episode"]["r"]))
    env.close()
    return returns


class MetricsLogger:
    """One CSV row per logged step under runs/{run_name}/, mirrored to W&B when tracking."""

    def __init__(self, path: str, columns: list, wandb_run=None):
        self.columns, self.wandb_run = ["global_step", *columns], wandb_run
        self.file = open(path, "w", buffering=1)
        self.file.write(",".join(self.columns) + "\n")

    def log(self, step: int, metrics: dict) -> None:
        values = {k: float(v) for k, v in metrics.items()}
        self.file.write(",".join([str(step), *(str(values.get(c, "")) for c in self.columns[1:])]) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log(values, step=step)

    def close(self) -> None:
        self.file.close()


def neighbour_count(args: Args, num_actions: int) -> int:
    """k: --k when given, else --k-ratio of the actions (at least one)."""
    return args.k if args.k is not None else max(1, round(args.k_ratio * num_actions))


def main(args: Args) -> None:
    check_args(args)
    env = make_env(args.env_id, args.seed)
    table_np = action_table(env.action_space, args.max_actions)
    num_actions, embedding_dim = table_np.shape
    k = neighbour_count(args, num_actions)
    if k > num_actions:
        fail(f"--k must be <= the number of actions ({num_actions}), got {k}")
    nets = Networks(Actor(embedding_dim), Critic(), k, args.knn == "approx", args.recall_target)
    table = jnp.asarray(table_np)
    key, k_actor, k_critic = jax.random.split(jax.random.PRNGKey(args.seed), 3)
    obs, _ = env.reset(seed=args.seed)
    params = dict(actor=jax.jit(nets.actor.init)(k_actor, obs[None]),
                  critic=jax.jit(nets.critic.init)(k_critic, obs[None], table[None, :1]))

    if args.load_model is not None:
        with open(args.load_model, "rb") as f:
            params = flax.serialization.from_bytes(params, f.read())
        returns = evaluate(nets, params, table, args.env_id, args.seed, args.eval_episodes)
        print(f"{args.load_model}: greedy return over {len(returns)} episode(s): {np.mean(returns):.2f} {returns}")
        return

    run_name = f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_dir = os.path.join("runs", run_name)
    os.makedirs(run_dir, exist_ok=True)
    wandb_run = None
    if args.track:
        import wandb

        wandb_run = wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, config=vars(args),
                               name=run_name, save_code=True)
    columns = ["charts/episodic_return", "charts/episodic_length", "charts/SPS", "charts/refine_changed",
               "losses/qf_loss", "losses/actor_loss", "losses/qf_values", "eval/episodic_return"]
    logger = MetricsLogger(os.path.join(run_dir, "metrics.csv"), columns, wandb_run)
    print(f"{run_name}: {num_actions} actions in {embedding_dim} embedding dims, k = {k} ({args.knn} k-NN)")

    actor_state = DDPGState.create(apply_fn=None, params=params["actor"], target_params=params["actor"],
                                   tx=optax.adam(args.learning_rate))
    critic_state = DDPGState.create(apply_fn=None, params=params["critic"], target_params=params["critic"],
                                    tx=optax.adam(args.learning_rate))
    transition = dict(obs=obs, action=np.zeros(embedding_dim, np.float32), reward=np.float32(0.0), next_obs=obs,
                      terminated=np.float32(0.0))  # `action` is the embedding of the action taken
    buffer = buffer_init(transition, args.buffer_size)
    pending = {name: np.zeros((args.train_frequency, *np.shape(v)), np.float32) for name, v in transition.items()}
    store = jax.jit(buffer_add, donate_argnums=0)
    train = functools.partial(
        update, nets, gamma=args.gamma, tau=args.tau, batch_size=args.batch_size, prioritized=args.prioritized_replay,
        alpha=args.priority_exponent, beta=args.importance_exponent, priority_epsilon=args.priority_epsilon,
        knn_in_target=args.knn_in_target)
    rng = np.random.default_rng(args.seed)  # the uniformly random actions before learning starts
    changed, policy_steps, updates, train_metrics, last_return = 0, 0, 0, {}, float("nan")
    start_time = time.time()

    for global_step in range(1, args.total_timesteps + 1):
        key, k_act, k_update = jax.random.split(key, 3)
        if global_step <= args.learning_starts:
            index = int(rng.integers(num_actions))
        else:
            decayed = min(1.0, global_step / max(1.0, args.exploration_fraction * args.total_timesteps))
            epsilon = args.epsilon + decayed * (args.end_epsilon - args.epsilon)
            index, nearest = select_action(nets, dict(actor=actor_state.params, critic=critic_state.params), table,
                                           obs, k_act, args.exploration_noise, epsilon)
            index = int(index)
            changed, policy_steps = changed + (index != int(nearest)), policy_steps + 1
        next_obs, reward, terminated, truncated, info = env.step(env_action(env.action_space, table_np, index))

        # A time-limit end is not terminal: the target bootstraps through it (partial-episode bootstrapping).
        slot = (global_step - 1) % args.train_frequency
        for name, v in dict(obs=obs, action=table_np[index], reward=reward, next_obs=next_obs,
                            terminated=terminated).items():
            pending[name][slot] = v
        obs = next_obs
        if terminated or truncated:
            logger.log(global_step, {"charts/episodic_return": info["episode"]["r"],
                                     "charts/episodic_length": info["episode"]["l"]})
            last_return = float(info["episode"]["r"])
            obs, _ = env.reset()

        if slot == args.train_frequency - 1:
            # A copy: on CPU, jax may read a numpy argument in place after the call has returned (asynchronous
            # dispatch), and `pending` is overwritten from the next step on.
            chunk = {name: v.copy() for name, v in pending.items()}
            if global_step >= args.learning_starts:
                actor_state, critic_state, buffer, metrics = train(
                    actor_state, critic_state, buffer, chunk, table, k_update,
                    update_actor=updates % args.policy_frequency == 0)
                train_metrics, updates = {**train_metrics, **metrics}, updates + 1
            else:
                buffer = store(buffer, chunk)

        if global_step % args.log_frequency == 0:
            sps = global_step / (time.time() - start_time)
            # How often the critic's pick differs from the action nearest the noisy proto-action.
            acting = {"charts/refine_changed": changed / policy_steps} if policy_steps else {}
            logger.log(global_step, {"charts/SPS": sps, **acting, **train_metrics})
            changed, policy_steps = 0, 0
            print(f"step {global_step:>8}  return {last_return:8.1f}  SPS {sps:.0f}", flush=True)
        if args.eval_frequency and (global_step % args.eval_frequency == 0 or global_step == args.total_timesteps):
            video_dir = os.path.join(run_dir, "videos", f"step{global_step}") if args.capture_video else None
            returns = evaluate(nets, dict(actor=actor_state.params, critic=critic_state.params), table, args.env_id,
                               args.seed + 10_000, args.eval_episodes, video_dir)
            logger.log(global_step, {"eval/episodic_return": np.mean(returns)})
            print(f"step {global_step:>8}  greedy evaluation return {np.mean(returns):.1f}", flush=True)

    if args.save_model:
        path = os.path.join(run_dir, f"{args.exp_name}.flax")
        with open(path, "wb") as f:
            f.write(flax.serialization.to_bytes(dict(actor=actor_state.params, critic=critic_state.params)))
        print(f"model saved to {path}")
    logger.close()
    env.close()
    if wandb_run is not None:
        wandb_run.finish()


if __name__ == "__main__":
    main(tyro.cli(Args))
