"""QMLE: Q-learning with maximum likelihood estimation, on the DeepMind Control Suite.

max_a Q(s, a) is approximated over a sampled candidate set: uniform samples of the action box and of its bin grid,
samples of two arg-max predictors (a delta and a factored categorical) and, for targets, the best action found so far
for that transition, cached in the replay buffer. The predictors learn by maximum likelihood toward those arg-maxes,
so the search amortises itself over training. No policy gradient anywhere. Tavakoli, Ghiassian, Rakicevic, "Learning
in complex action spaces without policy gradients", TMLR 2025, Algorithm 1 and Appendix B; docs/qmle_dmc.md.

    python qmle_dmc.py --env-id dog-walk --m-target 100   # the headline: 38 action dimensions
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
    env_id: str = "walker-walk"  # DeepMind Control task `domain-task` (e.g. dog-walk) or a Gymnasium Box-action id
    total_timesteps: int = 100_000  # environment steps to train for
    learning_rate: float = 5e-4  # Adam step size of the Q network and both arg-max predictors
    buffer_size: int = 1_000_000  # replay memory capacity in transitions
    gamma: float = 0.99  # discount factor
    batch_size: int = 256  # transitions per update
    learning_starts: int = 1000  # environment steps before the first update
    train_frequency: int = 10  # environment steps between updates
    target_network_frequency: int = 200  # environment steps between target copies (paper: 2000; release: 200)
    epsilon: float = 0.1  # probability of a uniformly random action while training
    prioritized_replay: bool = True  # proportional prioritised replay (--no-prioritized-replay: uniform)
    priority_exponent: float = 0.6  # alpha: how strongly priorities skew sampling
    importance_exponent: float = 0.2  # beta: strength of the importance-sampling correction
    priority_epsilon: float = 1e-6  # added to |TD error|, so that no transition has zero priority
    m_greedy: int = 1000  # candidate actions evaluated to act greedily
    m_target: int = 100  # candidates per replayed transition in the target search (its cached arg-max on top)
    rho_uniform: float = 0.9  # share of each budget sampled uniformly (budgets split by largest remainder)
    grid_fraction: float = 0.5  # share of the uniform samples from the bin grid, the rest from the box (Fig. 8: 0)
    rho_delta: float = 0.01  # share of each budget from the delta predictor (its point, then perturbations)
    rho_categorical: float = 0.09  # share of each budget from the factored categorical predictor
    num_bins: int = 3  # bins per action dimension of the grid and the categorical predictor (3: bang-off-bang)
    delta_noise_std: float = 0.1  # std of the Gaussian perturbations around the delta predictor's point
    cache_argmax: bool = True  # search each transition's cached arg-max for its target (Alg. 1; off in Fig. 8)
    discrete_steps: int = 0  # curriculum (Fig. 12): act and search on the bin grid alone for this many steps
    # Where the authors' release differs from the paper, either choice (docs/qmle_dmc.md); the defaults: all but two
    categorical_loss: Literal["logits", "softmax-twice"] = "logits"  # CE on logits (paper), or their softmax (release)
    predictor_target: Literal["refreshed", "cached"] = "cached"  # learn the new arg-max (Alg. 1), or cached (release)
    importance_normalisation: Literal["batch", "buffer"] = "buffer"  # by the batch's max weight, or buffer's (release)
    prioritized_draws: Literal["stratified", "independent"] = "stratified"  # one per slice of the sum, or any (release)
    bias_init: Literal["zeros", "uniform"] = "uniform"  # dense biases at 0, or PyTorch's U(+-1/sqrt(fan_in)) (release)
    joint_init: Literal["halves", "whole"] = "whole"  # joint halves at their own fan-in, or the layer's (release)

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


# ---- the algorithm: network, candidate sets, search, update ----
def elu(x):  # through exp, not expm1: equal in float32 and twice as fast on XLA's CPU backend
    return jnp.where(x > 0, x, jnp.exp(jnp.minimum(x, 0.0)) - 1.0)


# PyTorch's nn.Linear weight scale, U(+-1/sqrt(fan_in)), as in the authors' release (Flax's LeCun normal learned
# walker-walk slower); release_init draws the biases and the joint layer as the release does.
Dense = functools.partial(nn.Dense, kernel_init=nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform"))


class ResidualBlock(nn.Module):  # x + W2 relu(W1 x), the release's form (a pre-activation ReLU learned slower)
    features: int

    @nn.compact
    def __call__(self, x):
        h = Dense(self.features)(x)  # named Dense_0 by being made first: saved parameters are keyed by name
        return x + Dense(self.features)(nn.relu(h))


class QMLENetwork(nn.Module):
    """Appendix B.1: Q(s, a) = head(LN-ELU(joint(concat(obs_stream(s), action_stream(a))))) and two arg-max
    predictors on the observation stream. The stream, and the observation half of the joint block's first layer,
    are computed once per state and broadcast over that state's candidates."""

    action_dim: int
    num_bins: int

    def setup(self):
        self.obs_embed, self.obs_block, self.obs_norm = Dense(128), ResidualBlock(128), nn.LayerNorm()
        self.act_embed, self.act_norm = Dense(128), nn.LayerNorm()
        self.joint_in_obs, self.joint_in_act = Dense(256), Dense(256, use_bias=False)
        self.joint_out, self.joint_norm, self.q_head = Dense(256), nn.LayerNorm(), Dense(1)
        self.delta_hidden, self.delta_head = Dense(128), Dense(self.action_dim)
        self.categorical_hidden, self.categorical_head = Dense(128), Dense(self.action_dim * self.num_bins)

    def __call__(self, obs, actions):
        embedding, delta, logits = self.heads(obs)
        return self.q_values(embedding, actions), delta, logits

    def heads(self, obs):  # [..., obs_dim] -> the stream [..., 128], the delta [..., D], the logits [..., D, bins]
        embedding = elu(self.obs_norm(self.obs_block(self.obs_embed(obs))))
        hidden = jax.lax.stop_gradient(embedding)  # the predictors read the stream but never train it
        delta = jnp.tanh(self.delta_head(nn.relu(self.delta_hidden(hidden))))
        logits = self.categorical_head(nn.relu(self.categorical_hidden(hidden)))
        return embedding, delta, logits.reshape(*embedding.shape[:-1], self.action_dim, self.num_bins)

    def q_values(self, embedding, actions):  # [..., 128], [..., M, D] -> [..., M]
        a = elu(self.act_norm(self.act_embed(actions)))
        h = self.joint_out(nn.relu(self.joint_in_obs(embedding)[..., None, :] + self.joint_in_act(a)))
        x = jnp.concatenate([jnp.broadcast_to(embedding[..., None, :], a.shape), a], axis=-1)
        return self.q_head(elu(self.joint_norm(x + h)))[..., 0]


def release_init(params, key, bias_init: str, joint_init: str):
    """The release's PyTorch init: biases from U(+-1/sqrt(fan_in)) like the weights, the joint layer as one layer of
    fan-in 256 (U(+-1/sqrt(128)) times sqrt(1/2)); LayerNorm biases stay at zero."""
    flat = flax.traverse_util.flatten_dict(params)
    if joint_init == "whole":
        for name in ("joint_in_obs", "joint_in_act"):
            flat["params", name, "kernel"] = flat["params", name, "kernel"] * np.sqrt(0.5)
    if bias_init == "uniform":
        biases = [path for path in flat if path[-1] == "bias" and (*path[:-1], "kernel") in flat]
        for path, k in zip(biases, jax.random.split(key, len(biases))):
            fan_in = flat[(*path[:-1], "kernel")].shape[0] * (2 if path[-2] == "joint_in_obs" else 1)
            flat[path] = jax.random.uniform(k, flat[path].shape, minval=-(fan_in**-0.5), maxval=fan_in**-0.5)
    return flax.traverse_util.unflatten_dict(flat)


class Budget(NamedTuple):  # candidates per source, laid out in this order
    uniform_continuous: int
    uniform_grid: int
    delta: int
    categorical: int

    @staticmethod
    def split(m: int, rho_uniform: float, rho_delta: float, rho_categorical: float, grid_fraction: float = 0.5):
        """Largest-remainder rounding of m * rho, so that the parts add up to m."""
        shares = np.array([rho_uniform, rho_delta, rho_categorical]) * m
        counts = np.floor(shares).astype(int)
        counts[np.argsort(counts - shares)[: m - counts.sum()]] += 1
        uniform, delta, categorical = (int(c) for c in counts)
        return Budget(uniform - int(uniform * grid_fraction), int(uniform * grid_fraction), delta, categorical)


SOURCES = ("uniform", "grid", "delta", "categorical", "cached")


def bins(num_bins: int, u=None) -> jax.Array:  # the bin values; or drawn uniformly from them by uniforms u in [0, 1)
    values = jnp.linspace(-1.0, 1.0, num_bins)
    return values if u is None else values[jnp.minimum(num_bins * u, num_bins - 1).astype(jnp.int32)]


def sample_candidates(key, delta, logits, budget: Budget, noise_std: float, discrete: bool = False):
    """Eq. 21's candidate set for a batch of states: delta [B, D], logits [B, D, bins] -> [B, M, D]."""
    (batch, dim), num_bins = delta.shape, logits.shape[-1]
    k_cont, k_grid, k_delta, k_cat = jax.random.split(key, 4)
    # Bins come from one uniform each, scaled (uniform bins) or through the inverse CDF (categorical): randint's and
    # Gumbel-max's distributions for a fraction of their random bits (dog: 1e6 draws per update).
    uniform = jax.random.uniform(k_cont, (batch, budget.uniform_continuous, dim), minval=-1.0, maxval=1.0)
    if discrete:  # the curriculum's grid phase: uniform over the bins, not the box snapped (its middle bin twice)
        uniform = bins(num_bins, (uniform + 1.0) / 2.0)
    grid = bins(num_bins, jax.random.uniform(k_grid, (batch, budget.uniform_grid, dim)))
    noise = noise_std * jax.random.normal(k_delta, (batch, budget.delta, dim)) * (jnp.arange(budget.delta) > 0)[:, None]
    around_delta = jnp.clip(delta[:, None, :] + noise, -1.0, 1.0)  # sample 0 is the predicted point itself
    cdf = jnp.cumsum(jax.nn.softmax(logits, axis=-1), axis=-1)[:, None, :, :-1]  # [B, 1, D, bins - 1]
    categorical = bins(num_bins)[(jax.random.uniform(k_cat, (batch, budget.categorical, dim, 1)) > cdf).sum(-1)]
    candidates = jnp.concatenate([uniform, grid, around_delta, categorical], axis=1)
    return bins(num_bins)[jnp.abs(candidates[..., None] - bins(num_bins)).argmin(-1)] if discrete else candidates


def source_counts(best_index: jax.Array, budget: Budget) -> jax.Array:
    """Arg-maxes per source in SOURCES (an index past the budget is the cached one; -1, a random action, counts not)."""
    source = jnp.searchsorted(jnp.cumsum(jnp.array(budget)), best_index.ravel(), side="right")
    return jnp.bincount(source, weights=(best_index.ravel() >= 0).astype(jnp.float32), length=len(SOURCES))


CHUNK_ROWS = 3232  # candidates whose activations stay in a CPU's cache together (q_over_candidates)


def q_over_candidates(model: QMLENetwork, params, embedding, candidates, rows_per_chunk: int = CHUNK_ROWS):
    """Q of every candidate of every state, [B, 128], [B, M, D] -> [B, M], about rows_per_chunk candidates at a
    time: each chunk's activations stay in cache between the matmuls, which halves the time on a CPU."""
    batch, per_state = candidates.shape[:2]
    chunk = np.gcd(batch, max(rows_per_chunk // per_state, 1))
    chunks = [x.reshape(batch // chunk, chunk, *x.shape[1:]) for x in (embedding, candidates)]
    return jax.lax.map(lambda xs: model.apply(params, *xs, method=QMLENetwork.q_values), chunks).reshape(batch, -1)


@functools.partial(jax.jit, static_argnames=("model", "budget", "noise_std", "discrete"), donate_argnames=("wins",))
def act(model: QMLENetwork, params, obs, key, wins, epsilon, budget: Budget, noise_std: float, discrete=False):
    """Eq. 17's greedy action over m_greedy candidates, or with probability epsilon a uniform one, for N states: the
    loop's one device call per step. Also the next keys, and the greedy arg-maxes counted by source into `wins`."""
    key, k_act, k_update = jax.random.split(key, 3)
    k_candidates, k_explore, k_random = jax.random.split(k_act, 3)
    embedding, delta, logits = model.apply(params, obs, method=QMLENetwork.heads)
    candidates = sample_candidates(k_candidates, delta, logits, budget, noise_std, discrete)
    best = q_over_candidates(model, params, embedding, candidates).argmax(-1)
    greedy = jnp.take_along_axis(candidates, best[:, None, None], axis=1)[:, 0]
    random_action = jax.random.uniform(k_random, delta.shape, minval=-1.0, maxval=1.0)
    if discrete:
        random_action = bins(logits.shape[-1], (random_action + 1.0) / 2.0)
    explore = jax.random.uniform(k_explore, best.shape) < epsilon
    best = jnp.where(explore, -1, best)
    return jnp.where(explore[:, None], random_action, greedy), key, k_update, wins + source_counts(best, budget)


def target_argmax(model: QMLENetwork, target_params, next_obs, cached, key, cfg, discrete: bool = False):
    """The target network's arg-max at s' over Eq. 21's set: its predictors' and uniform samples and, with
    cfg.cache_argmax, the transition's cached arg-max. Returns the arg-max, its Q and the winner's index."""
    embedding, delta, logits = model.apply(target_params, next_obs, method=QMLENetwork.heads)
    candidates = sample_candidates(key, delta, logits, cfg.target_budget, cfg.delta_noise_std, discrete)
    if cfg.cache_argmax:
        candidates = jnp.concatenate([candidates, cached[:, None, :]], axis=1)
    q = q_over_candidates(model, target_params, embedding, candidates)
    best = q.argmax(axis=1)
    return jnp.take_along_axis(candidates, best[:, None, None], axis=1)[:, 0], q.max(axis=1), best


UpdateConfig = collections.namedtuple(
    "UpdateConfig",
    """target_budget updates gamma batch_size delta_noise_std
    prioritized_replay priority_exponent importance_exponent priority_epsilon cache_argmax categorical_loss
    predictor_target importance_normalisation prioritized_draws""",
)  # the update's settings: one static argument


class QMLEState(TrainState):  # apply_fn unused (None): the model is passed to each jitted function
    target_params: Any


@functools.cache
def adam(learning_rate: float):  # one optimizer per rate, so that a second run in one process compiles nothing
    return optax.adam(learning_rate)


def gradient_step(model: QMLENetwork, state: QMLEState, buffer, key, cfg: UpdateConfig, discrete: bool):
    """Algorithm 1's replay step. Each transition carries a cached arg-max (its own action when stored): the target
    search at s' takes it as one more candidate and the search's winner replaces it; the predictors learn at s'
    toward the arg-max carried in (the release) or the new winner (Alg. 1). One Adam step on the importance-weighted
    TD loss plus both predictors' maximum-likelihood losses."""
    k_sample, k_target = jax.random.split(key)
    stratified = cfg.prioritized_draws == "stratified"
    index, batch, weights = buffer_sample(
        buffer, k_sample, cfg.batch_size, cfg.prioritized_replay, cfg.importance_exponent, stratified
    )
    next_argmax, next_q, best = target_argmax(
        model, state.target_params, batch["next_obs"], batch["argmax"], k_target, cfg, discrete
    )
    td_target = batch["reward"] + cfg.gamma * (1.0 - batch["terminated"]) * next_q
    predictor_goal = next_argmax if cfg.predictor_target == "refreshed" else batch["argmax"]
    target_bins = jnp.abs(predictor_goal[..., None] - bins(model.num_bins)).argmin(-1)
    if cfg.prioritized_replay and cfg.importance_normalisation == "buffer":  # (p_min / p_i) ** beta
        leaves = buffer.tree.shape[0] // 2
        stored = jnp.where(jnp.arange(leaves) < buffer.size, buffer.tree[leaves:], jnp.inf)
        weights = (stored.min() / buffer.tree[leaves + index]) ** cfg.importance_exponent

    def loss_fn(params):
        embedding = model.apply(params, batch["obs"], method=QMLENetwork.heads)[0]
        q = model.apply(params, embedding, batch["action"][:, None], method=QMLENetwork.q_values)[:, 0]
        _, delta, logits = model.apply(params, batch["next_obs"], method=QMLENetwork.heads)
        delta_loss = jnp.mean((delta - predictor_goal) ** 2)  # a Gaussian's log-likelihood, fixed variance
        if cfg.categorical_loss == "softmax-twice":  # the release's slip: log-softmax of probabilities
            logits = jax.nn.softmax(logits)
        cat_loss = optax.softmax_cross_entropy_with_integer_labels(logits, target_bins).mean()
        td_loss = jnp.mean(weights * (td_target - q) ** 2)
        return td_loss + delta_loss + cat_loss, (td_loss, delta_loss, cat_loss, td_target - q, q)

    grads, (td_loss, delta_loss, cat_loss, td_error, q) = jax.grad(loss_fn, has_aux=True)(state.params)
    priority = jnp.abs(td_error) + cfg.priority_epsilon if cfg.prioritized_replay else None
    buffer = buffer_update(buffer, index, priority, cfg.priority_exponent, argmax=next_argmax)
    losses = dict(td_loss=td_loss, delta_mle_loss=delta_loss, categorical_mle_loss=cat_loss, q_values=q.mean())
    metrics = {f"argmax/target_{s}": n / best.size for s, n in zip(SOURCES, source_counts(best, cfg.target_budget))}
    return state.apply_gradients(grads=grads), buffer, dict(metrics, **{f"losses/{k}": v for k, v in losses.items()})


@functools.partial(jax.jit, static_argnames=("model", "cfg", "discrete"), donate_argnames=("buffer",))
def update(model: QMLENetwork, state: QMLEState, buffer, new_transitions, key, cfg: UpdateConfig, discrete=False):
    """The loop's device call per replay period: store the transitions gathered since the last one, each with its
    own action as its cached arg-max, then take cfg.updates gradient steps (none before --learning-starts)."""
    buffer = buffer_add(buffer, dict(new_transitions, argmax=new_transitions["action"]))
    if cfg.updates <= 1:  # one step takes the key itself: one environment reproduces its single-environment run
        return gradient_step(model, state, buffer, key, cfg, discrete) if cfg.updates else (state, buffer, {})

    def step(carry, k):
        state, buffer, metrics = gradient_step(model, *carry, k, cfg, discrete)
        return (state, buffer), metrics

    (state, buffer), metrics = jax.lax.scan(step, (state, buffer), jax.random.split(key, cfg.updates))
    return state, buffer, jax.tree.map(lambda m: m[-1], metrics)


def evaluate(policy, params, args, label: str, discrete=False, video_dir: Optional[str] = None) -> float:
    """Mean greedy return (epsilon 0) over --eval-episodes episodes of a fresh environment reset with seeds --seed +
    10000, + 10001, ..., printed after `label` (--load-model thus scores a model as its run did)."""
    seed, env = args.seed + 10_000, make_env(args.env_id, args.seed + 10_000, video_dir)
    key, wins, returns = jax.random.PRNGKey(seed), jnp.zeros(len(SOURCES)), []
    for episode in range(args.eval_episodes):
        obs, _ = env.reset(seed=seed + episode)
        done = False
        while not done:
            action, key, _, wins = policy(params, obs[None], key, wins, 0.0, discrete=discrete)
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
    """A DeepMind Control or Gymnasium task with flat float32 observations and actions in [-1, 1]."""
    env = checked_env(env_id, video_dir)
    if not isinstance(env.action_space, gym.spaces.Box) or len(env.action_space.shape) != 1:
        fail(f"--env-id {env_id!r} has {env.action_space} actions; {SCRIPT} needs a one-dimensional Box")
    env = gym.wrappers.RecordEpisodeStatistics(gym.wrappers.RescaleAction(env, -1.0, 1.0))
    env.action_space.seed(seed)
    return env


def check_args(args: Args) -> None:
    fractions = "rho_uniform rho_delta rho_categorical grid_fraction"
    check_common(args, "target_network_frequency m_greedy m_target", "discrete_steps delta_noise_std", fractions)
    if args.num_bins < 2:
        fail(f"--num-bins must be >= 2, got {args.num_bins}")
    if abs(args.rho_uniform + args.rho_delta + args.rho_categorical - 1.0) > 1e-6:
        fail("--rho-uniform, --rho-delta and --rho-categorical must sum to 1")


def check_searches(args: Args, action_dim: int) -> None:
    """Refuse an arg-max search that cannot fit, counting less than XLA allocates (so that nothing that fits is
    refused): 3 float32 copies of its candidates, 4 of a chunk's 256 hidden units, the categorical head's weights (5
    copies in an update) and 3 of its logits per state. --load-model only acts, on one state."""
    searches = {"--m-greedy": (args.m_greedy, 1 if args.load_model else args.num_envs)}
    if not args.load_model:
        searches["--m-target"] = (args.m_target, args.batch_size)
    for flag, (m, states) in searches.items():
        need = 12 * states * (m + 1) * action_dim + 16 * 256 * max(m + 1, CHUNK_ROWS)
        need += 4 * action_dim * args.num_bins * (5 * 129 + 3 * states)
        check_fits(f"{flag} {m:,} for {states:,} states of {action_dim} dims, --num-bins {args.num_bins}", need)


def acted_on_grid(global_step: int, args: Args) -> bool:  # so that an evaluation judges the policy that was trained
    return max(global_step - args.num_envs, 0) < args.discrete_steps  # the step before global_step was on the grid


MODEL_SETTINGS = ("env_id", "num_bins")  # what a saved model's shapes and meaning depend on, besides the script


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


METRICS = """charts/episodic_return charts/episodic_length charts/SPS losses/td_loss losses/delta_mle_loss
    losses/categorical_mle_loss losses/q_values argmax/greedy_uniform argmax/greedy_grid argmax/greedy_delta
    argmax/greedy_categorical argmax/target_uniform argmax/target_grid argmax/target_delta argmax/target_categorical
    argmax/target_cached eval/episodic_return""".split()  # metrics.csv's columns, in this order


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
    check_searches(args, action_dim)
    model = QMLENetwork(action_dim, args.num_bins)
    rhos = (args.rho_uniform, args.rho_delta, args.rho_categorical, args.grid_fraction)
    greedy_budget, target_budget = Budget.split(args.m_greedy, *rhos), Budget.split(args.m_target, *rhos)
    policy = functools.partial(act, model, budget=greedy_budget, noise_std=args.delta_noise_std)
    key, k_init = jax.random.split(jax.random.PRNGKey(args.seed))
    init = jax.jit(QMLENetwork.init, static_argnums=0)  # keyed on the model's settings: a second run reuses it
    params = init(model, k_init, example_obs[None], jnp.zeros((1, 1, action_dim)))
    params = release_init(params, jax.random.fold_in(k_init, 1), args.bias_init, args.joint_init)
    if args.load_model:  # its run's evaluation seeds and budget: it scores what its run logged
        video_dir = args.capture_video and os.path.join(os.path.dirname(args.load_model), "videos", "evaluation")
        label = f"{args.load_model} on {args.env_id}" + f" (videos in {video_dir})" * bool(video_dir)
        params, discrete = restore(params, saved, "--load-model"), acted_on_grid(meta["global_step"], args)
        evaluate(policy, params, args, label, discrete, video_dir)
        return

    transition = dict(obs=example_obs, next_obs=example_obs, action=np.zeros(action_dim, np.float32))
    transition.update(reward=np.float32(0), terminated=np.float32(0))
    stored = dict(transition, argmax=transition["action"])  # Alg. 1: each transition caches the best action found
    check_fits(f"--buffer-size {args.buffer_size}", args.buffer_size * (sum(v.nbytes for v in stored.values()) + 16))
    rows = math.lcm(args.num_envs, args.train_frequency)  # transitions per update call
    settings = (getattr(args, name) for name in UpdateConfig._fields[2:])  # Args' fields of the same names
    cfg = UpdateConfig(target_budget, rows // args.train_frequency, *settings)
    cfgs = (cfg._replace(updates=0), cfg)  # before --learning-starts, and after
    logger, global_step = Logger(args, METRICS, meta), meta["global_step"] if meta else 0
    print(f"{logger.run_dir}: {action_dim} action dims; greedy {greedy_budget}; target {target_budget}")
    state = QMLEState.create(apply_fn=None, params=params, target_params=params, tx=adam(args.learning_rate))
    pending = {k: np.zeros((rows, *np.shape(v)), np.float32) for k, v in transition.items()}
    run = dict(state=jax.tree.map(jnp.asarray, state), key=key, wins=jnp.zeros(len(SOURCES)), pending=pending)
    run.update(buffer=buffer_init(stored, args.buffer_size), envs=dict(envs=np.zeros(0, np.uint8), obs=np.zeros(0)))
    run = restore(run, saved, "--resume") if meta else run
    state, buffer, key, wins, pending = (run[k] for k in ("state", "buffer", "key", "wins", "pending"))

    def checkpoint(whole=True):  # the whole run state, environments included, so that --resume continues it
        tree = dict(state=state, buffer=buffer, key=key, wins=wins, pending=pending, envs=saved_envs(envs, obs, whole))
        info = dict(args=vars(args), global_step=global_step, wandb_id=logger.wandb and logger.wandb.id)
        return save_arrays(os.path.join(logger.run_dir, "checkpoint.npz"), tree, info)

    def evaluation(discrete):  # logged at this step; videos into videos/step{N}
        video_dir = args.capture_video and f"{logger.run_dir}/videos/step{global_step}"
        mean = evaluate(policy, state.params, args, f"step {global_step:>8}", discrete, video_dir)
        logger.log(global_step, {"eval/episodic_return": mean})

    crossed = lambda period: period > 0 and global_step // period > previous // period  # passed a multiple of it?
    obs = continued_envs(envs, run["envs"], args.seed)
    outcome, metrics, returns, last_log = "crashed", {}, [], (time.time(), global_step)
    print("compiling the greedy action (XLA) ...")
    try:
        while global_step < args.total_timesteps and not stop:
            discrete = global_step < args.discrete_steps
            actions, key, k_update, wins = policy(state.params, obs, key, wins, args.epsilon, discrete=discrete)
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
                state, buffer, metrics = update(model, state, buffer, chunk, k_update, cfgs[learn], discrete)
            if crossed(args.target_network_frequency):
                state = state.replace(target_params=state.params)
            if crossed(args.log_frequency):
                now, counts = time.time(), np.asarray(wins)[:-1]  # acting has no cached candidate
                sps = (global_step - last_log[1]) / (now - last_log[0])
                greedy = {f"argmax/greedy_{s}": n / max(counts.sum(), 1) for s, n in zip(SOURCES, counts)}
                logger.log(global_step, {"charts/SPS": sps, **metrics, **greedy})
                eta = time.strftime("%H:%M:%S", time.gmtime((args.total_timesteps - global_step) / sps))
                mean, seconds = np.mean(returns or np.nan), now - started
                print(f"step {global_step:>8}  return {mean:8.1f}  SPS {sps:4.0f}  ETA {eta}  ({seconds:.0f} s so far)")
                wins, last_log, returns = jnp.zeros(len(SOURCES)), (now, global_step), []
            if crossed(args.checkpoint_frequency) and global_step < args.total_timesteps:
                checkpoint()
            if crossed(args.eval_frequency) and global_step < args.total_timesteps:
                evaluation(discrete)
        outcome = "interrupted" if stop else "finished"
    finally:  # a crash's traceback follows, after the model and the checkpoint are saved
        final_evaluation = lambda: evaluation(acted_on_grid(global_step, args))
        finish(args, outcome, global_step, state.params, logger, envs, final_evaluation, checkpoint)
    if stop:
        sys.exit(128 + stop[0])


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `--help | head -1` ends quietly, as other commands do
    parsed = tyro.cli(Args)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    main(parsed)
