"""QMLE: Q-learning with maximum likelihood estimation, on the DeepMind Control Suite.

max_a Q(s, a) is approximated by evaluating an action-in Q network on a sampled candidate set: uniform
samples of the action box, samples of two parametric arg-max predictors (a delta and a factored categorical
over bang-off-bang bins) and, for targets, the best action found for that transition so far (cached in the
replay buffer and written back on every replay). The predictors are trained by maximum likelihood toward
those arg-max approximations, so the search amortises itself over training. No policy gradient anywhere.

Paper: Tavakoli, Ghiassian, Rakicevic, "Learning in complex action spaces without policy gradients",
TMLR 2025 (arXiv 2410.06317), Algorithm 1 and Appendix B.  Headline run (38 action dimensions):

    python qmle_dmc.py --env-id dog-walk --m-target 100
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
    """save the parameters to runs/{run_name}/qmle_dmc.flax at the end"""
    load_model: Optional[str] = None
    """path of a saved model: evaluate it greedily for --eval-episodes episodes instead of training"""

    env_id: str = "walker-walk"
    """DeepMind Control id `domain-task` (e.g. dog-walk, cartpole-swingup) or a Gymnasium Box-action id"""
    total_timesteps: int = 100_000
    """environment steps to train for"""
    learning_rate: float = 5e-4
    """Adam step size, shared by the Q network and the arg-max predictors"""
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
    """environment steps between hard copies of Q and predictors into the target (paper: 2000; release: 200)"""
    epsilon: float = 0.1
    """probability of a uniformly random action while training"""
    prioritized_replay: bool = True
    """proportional prioritised replay; --no-prioritized-replay samples uniformly"""
    priority_exponent: float = 0.6
    """alpha: how strongly priorities skew sampling"""
    importance_exponent: float = 0.2
    """beta: strength of the importance-sampling correction"""
    priority_epsilon: float = 1e-6
    """added to abs TD error so no transition gets zero priority"""

    m_greedy: int = 1000
    """candidate actions evaluated to act greedily"""
    m_target: int = 100
    """candidate actions evaluated per replayed transition for the target (the cached arg-max comes on top)"""
    rho_uniform: float = 0.9
    """share of each budget sampled uniformly (half from the continuous box, half from the bin grid)"""
    rho_delta: float = 0.01
    """share of each budget from the delta predictor (its point, then Gaussian perturbations)"""
    rho_categorical: float = 0.09
    """share of each budget from the factored categorical predictor"""
    num_bins: int = 3
    """bins per action dimension of the grid and categorical predictor (3 = bang-off-bang)"""
    delta_noise_std: float = 0.1
    """std of the Gaussian perturbations around the delta predictor's point"""
    discrete_steps: int = 0
    """curriculum (paper Fig. 12): act and search on the bin grid alone for this many steps, then continuous"""

    eval_frequency: int = 10_000
    """environment steps between greedy evaluations (0 = never)"""
    eval_episodes: int = 1
    """episodes per greedy evaluation"""
    log_frequency: int = 1000
    """environment steps between console and metrics lines"""


def check_args(args: Args) -> None:
    """Reject settings that would crash later or silently train something else."""
    at_least = dict(total_timesteps=1, m_greedy=1, m_target=1, batch_size=1, buffer_size=1, train_frequency=1,
                    target_network_frequency=1, num_bins=2, eval_episodes=1, log_frequency=1)
    at_least_zero = dict(learning_starts=0, eval_frequency=0, discrete_steps=0, delta_noise_std=0.0,
                         priority_epsilon=0.0, priority_exponent=0.0, importance_exponent=0.0)
    for name, low in {**at_least, **at_least_zero}.items():
        if getattr(args, name) < low:
            fail(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}")
    for name in ("gamma", "epsilon", "rho_uniform", "rho_delta", "rho_categorical"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            fail(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(args, name)}")
    ratio_sum = args.rho_uniform + args.rho_delta + args.rho_categorical
    if abs(ratio_sum - 1.0) > 1e-6:
        fail(f"--rho-uniform, --rho-delta and --rho-categorical must sum to 1, got {ratio_sum:g}")
    if args.load_model is not None and not os.path.isfile(args.load_model):
        fail(f"--load-model: no such file: {args.load_model}")


def fail(message: str) -> None:
    raise SystemExit(f"error: {message}")


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
    env = gym.make(gym_id, render_mode="rgb_array" if render else None)
    if not isinstance(env.action_space, gym.spaces.Box):
        fail(f"--env-id {env_id!r} has {type(env.action_space).__name__} actions; qmle_dmc.py needs a Box")
    env = gym.wrappers.FlattenObservation(env)
    env = gym.wrappers.DtypeObservation(env, np.float32)
    env = gym.wrappers.RescaleAction(env, -1.0, 1.0)  # every search below happens in [-1, 1]^D
    env = gym.wrappers.RecordEpisodeStatistics(env)
    env.action_space.seed(seed)
    return env


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


def elu(x):
    """ELU through exp, not expm1: equal to float32 precision and twice as fast on XLA's CPU backend, where
    the ELUs over every candidate's activations are a tenth of an update."""
    return jnp.where(x > 0, x, jnp.exp(jnp.minimum(x, 0.0)) - 1.0)


# PyTorch nn.Linear's default weight scale, U(+-1/sqrt(fan_in)), as in the authors' release; Flax's default (LeCun
# normal, sqrt(3) times larger) learned walker-walk slower here. Biases start at zero. The split joint layer's two
# halves draw at their own fan-in (128 each), not at the 256 of the release's single layer: that is what was measured.
Dense = functools.partial(nn.Dense, kernel_init=nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform"))


class ResidualBlock(nn.Module):
    """x + W2 relu(W1 x): a residual block of two dense layers, width preserved, in the authors' release's
    form (the LayerNorm after it normalises the sum). Its input is used as it is, negative half included; a
    ReLU in front of W1 (the pre-activation form) learned walker-walk markedly slower here."""

    features: int

    @nn.compact
    def __call__(self, x):
        h = Dense(self.features)(x)
        return x + Dense(self.features)(nn.relu(h))


class QMLENetwork(nn.Module):
    """Appendix B.1: an action-in Q network plus two arg-max predictors reading its observation stream.

    Q(s, a) = head(LN-ELU(joint_block(concat(obs_stream(s), action_stream(a))))). The observation stream
    is computed once per state and broadcast over that state's candidates; the joint block's first layer
    is split into its observation and action halves (the same linear map as on the concatenation), so the
    observation half is a per-state product, not a per-candidate one.
    """

    action_dim: int
    num_bins: int

    def setup(self):
        self.obs_embed, self.obs_block, self.obs_norm = Dense(128), ResidualBlock(128), nn.LayerNorm()
        self.act_embed, self.act_norm = Dense(128), nn.LayerNorm()
        self.joint_in_obs, self.joint_in_act = Dense(256), Dense(256, use_bias=False)
        self.joint_out, self.joint_norm, self.q_head = Dense(256), nn.LayerNorm(), Dense(1)
        self.delta_hidden, self.delta_head = Dense(128), Dense(self.action_dim)
        self.categorical_hidden = Dense(128)
        self.categorical_head = Dense(self.action_dim * self.num_bins)

    def __call__(self, obs, actions):
        embedding = self.observation_stream(obs)
        return self.q_values(embedding, actions), self.delta(embedding), self.categorical_logits(embedding)

    def observation_stream(self, obs):  # [..., obs_dim] -> [..., 128]
        return elu(self.obs_norm(self.obs_block(self.obs_embed(obs))))

    def q_values(self, embedding, actions):  # [..., 128], [..., M, D] -> [..., M]
        a = elu(self.act_norm(self.act_embed(actions)))
        h = self.joint_in_obs(embedding)[..., None, :] + self.joint_in_act(a)
        h = self.joint_out(nn.relu(h))
        x = jnp.concatenate([jnp.broadcast_to(embedding[..., None, :], a.shape), a], axis=-1)
        return self.q_head(elu(self.joint_norm(x + h)))[..., 0]

    def delta(self, embedding):  # predictors see the stream but never train it
        return jnp.tanh(self.delta_head(nn.relu(self.delta_hidden(jax.lax.stop_gradient(embedding)))))

    def categorical_logits(self, embedding):  # [..., D, num_bins]
        h = nn.relu(self.categorical_hidden(jax.lax.stop_gradient(embedding)))
        return self.categorical_head(h).reshape(*embedding.shape[:-1], self.action_dim, self.num_bins)


class Budget(NamedTuple):
    """How many candidates each source contributes; candidates are laid out in this order."""

    uniform_continuous: int
    uniform_grid: int
    delta: int
    categorical: int

    @staticmethod
    def split(m: int, rho_uniform: float, rho_delta: float, rho_categorical: float) -> "Budget":
        """Largest-remainder rounding of m * rho, so the parts always add up to m."""
        shares = np.array([rho_uniform, rho_delta, rho_categorical]) * m
        counts = np.floor(shares).astype(int)
        counts[np.argsort(counts - shares)[: m - counts.sum()]] += 1
        uniform, delta, categorical = (int(c) for c in counts)
        return Budget(uniform - uniform // 2, uniform // 2, delta, categorical)


SOURCES = ("uniform", "grid", "delta", "categorical", "cached")


def bin_values(num_bins: int) -> jax.Array:
    return jnp.linspace(-1.0, 1.0, num_bins)


def snap_to_grid(actions: jax.Array, num_bins: int) -> jax.Array:
    bins = bin_values(num_bins)
    return bins[jnp.abs(actions[..., None] - bins).argmin(-1)]


def sample_candidates(key, delta, logits, budget: Budget, noise_std: float, discrete: bool = False):
    """Eq. 21's candidate set for a batch of states: delta [B, D], logits [B, D, bins] -> [B, M, D]."""
    (batch, dim), num_bins = delta.shape, logits.shape[-1]
    k_cont, k_grid, k_delta, k_cat = jax.random.split(key, 4)
    # Bins are drawn from one uniform each, by scaling (uniform bins) or inverse CDF (categorical): the same
    # distributions as randint and Gumbel-max, for a fraction of their random bits (dog: 1e6 draws per update).
    uniform = jax.random.uniform(k_cont, (batch, budget.uniform_continuous, dim), minval=-1.0, maxval=1.0)
    grid_u = jax.random.uniform(k_grid, (batch, budget.uniform_grid, dim))
    grid = bin_values(num_bins)[jnp.minimum(num_bins * grid_u, num_bins - 1).astype(jnp.int32)]
    noise = noise_std * jax.random.normal(k_delta, (batch, budget.delta, dim)) * (jnp.arange(budget.delta) > 0)[:, None]
    around_delta = jnp.clip(delta[:, None, :] + noise, -1.0, 1.0)  # sample 0 is the predicted point itself
    cdf = jnp.cumsum(jax.nn.softmax(logits, axis=-1), axis=-1)[:, None, :, :-1]  # [B, 1, D, bins - 1]
    cat_u = jax.random.uniform(k_cat, (batch, budget.categorical, dim, 1))
    categorical = bin_values(num_bins)[(cat_u > cdf).sum(-1)]
    candidates = jnp.concatenate([uniform, grid, around_delta, categorical], axis=1)
    return snap_to_grid(candidates, num_bins) if discrete else candidates


def source_fractions(best_index: jax.Array, budget: Budget) -> jax.Array:
    """Fraction of arg-maxes from each source in SOURCES (indices past the budget are the cached prior)."""
    edges = jnp.cumsum(jnp.array(budget))
    return jnp.bincount(jnp.searchsorted(edges, best_index, side="right"), length=len(SOURCES)) / best_index.size


class QMLEState(TrainState):
    target_params: Any


@functools.partial(jax.jit, static_argnames=("model", "budget", "noise_std", "discrete"))
def select_action(model: QMLENetwork, params, obs, key, epsilon, budget: Budget, noise_std: float,
                  discrete: bool = False):
    """Approximate greedy action (Eq. 17) over m_greedy candidates, or with prob. epsilon a uniform one.

    Returns (action [D], index of the winning candidate, or -1 when the action was random)."""
    k_candidates, k_explore, k_random = jax.random.split(key, 3)
    embedding = model.apply(params, obs[None], method=QMLENetwork.observation_stream)
    delta = model.apply(params, embedding, method=QMLENetwork.delta)
    logits = model.apply(params, embedding, method=QMLENetwork.categorical_logits)
    candidates = sample_candidates(k_candidates, delta, logits, budget, noise_std, discrete)[0]
    best = model.apply(params, embedding[0], candidates, method=QMLENetwork.q_values).argmax()
    random_action = jax.random.uniform(k_random, delta.shape[1:], minval=-1.0, maxval=1.0)
    if discrete:
        random_action = snap_to_grid(random_action, logits.shape[-1])
    explore = jax.random.uniform(k_explore) < epsilon
    return jnp.where(explore, random_action, candidates[best]), jnp.where(explore, -1, best)


def q_over_candidates(model: QMLENetwork, params, embedding, candidates, states_per_chunk: int = 32):
    """Q of every candidate of every state: [B, 128], [B, M, D] -> [B, M].

    Evaluated a few states at a time: each chunk's activations (32 x 101 x 256 floats at the defaults)
    stay in cache through the elementwise passes between the matmuls, which halves the time on a CPU.
    """
    batch = embedding.shape[0]
    chunk = np.gcd(batch, states_per_chunk)
    split = lambda x: x.reshape(batch // chunk, chunk, *x.shape[1:])  # noqa: E731
    q = jax.lax.map(lambda xs: model.apply(params, *xs, method=QMLENetwork.q_values),
                    (split(embedding), split(candidates)))
    return q.reshape(batch, -1)


def target_argmax(model: QMLENetwork, target_params, next_obs, prior, key, budget: Budget, noise_std: float,
                  discrete: bool = False):
    """Arg-max over Eq. 21's set (target predictors' samples, uniform samples, the cached prior) under Q-."""
    embedding = model.apply(target_params, next_obs, method=QMLENetwork.observation_stream)
    delta = model.apply(target_params, embedding, method=QMLENetwork.delta)
    logits = model.apply(target_params, embedding, method=QMLENetwork.categorical_logits)
    candidates = sample_candidates(key, delta, logits, budget, noise_std, discrete)
    candidates = jnp.concatenate([candidates, prior[:, None, :]], axis=1)
    q = q_over_candidates(model, target_params, embedding, candidates)
    best = q.argmax(axis=1)
    return jnp.take_along_axis(candidates, best[:, None, None], axis=1)[:, 0], q.max(axis=1), best


@functools.partial(jax.jit, static_argnames=("model", "batch_size", "budget", "noise_std", "prioritized",
                                             "alpha", "beta", "priority_epsilon", "discrete"),
                   donate_argnames=("buffer",))
def update(model: QMLENetwork, state: QMLEState, buffer: ReplayBuffer, new_transitions, key, *, gamma: float,
           batch_size: int, budget: Budget, noise_std: float, prioritized: bool, alpha: float, beta: float,
           priority_epsilon: float, discrete: bool = False):
    """One replay period of Algorithm 1 as a single device call: store the steps taken since the last
    call, sample, refresh each transition's arg-max, write arg-maxes and priorities back, take one Adam step.
    """
    buffer = buffer_add(buffer, new_transitions)
    k_sample, k_target = jax.random.split(key)
    index, batch, weights = buffer_sample(buffer, k_sample, batch_size, prioritized, beta)
    next_argmax, next_q, best = target_argmax(model, state.target_params, batch["next_obs"], batch["argmax"],
                                              k_target, budget, noise_std, discrete)
    td_target = batch["reward"] + gamma * (1.0 - batch["terminated"]) * next_q
    target_bins = jnp.abs(next_argmax[..., None] - bin_values(model.num_bins)).argmin(-1)

    def loss_fn(params):
        embedding = model.apply(params, batch["obs"], method=QMLENetwork.observation_stream)
        q = model.apply(params, embedding, batch["action"][:, None], method=QMLENetwork.q_values)[:, 0]
        td_error = td_target - q
        # The predictors learn at s' toward the arg-max just refreshed there (not the stale cached one).
        embedding = model.apply(params, batch["next_obs"], method=QMLENetwork.observation_stream)
        delta = model.apply(params, embedding, method=QMLENetwork.delta)
        logits = model.apply(params, embedding, method=QMLENetwork.categorical_logits)
        delta_loss = jnp.mean((delta - next_argmax) ** 2)  # Gaussian log-likelihood, fixed variance
        categorical_loss = optax.softmax_cross_entropy_with_integer_labels(logits, target_bins).mean()
        td_loss = jnp.mean(weights * td_error**2)
        return td_loss + delta_loss + categorical_loss, (td_loss, delta_loss, categorical_loss, td_error, q)

    grads, (td_loss, delta_loss, categorical_loss, td_error, q) = jax.grad(loss_fn, has_aux=True)(state.params)
    buffer = buffer_update(buffer, index, jnp.abs(td_error) + priority_epsilon if prioritized else None,
                           alpha, argmax=next_argmax)
    metrics = {"losses/td_loss": td_loss, "losses/delta_mle_loss": delta_loss,
               "losses/categorical_mle_loss": categorical_loss, "losses/q_values": q.mean(),
               **{f"argmax/target_{s}": f for s, f in zip(SOURCES, source_fractions(best, budget))}}
    return state.apply_gradients(grads=grads), buffer, metrics


def evaluate(model, params, env_id: str, seed: int, episodes: int, budget: Budget, noise_std: float,
             discrete: bool = False, video_dir: Optional[str] = None) -> list:
    """Greedy returns (epsilon 0) of `episodes` episodes on a fresh environment."""
    env = make_env(env_id, seed, render=video_dir is not None)
    if video_dir is not None:
        env = gym.wrappers.RecordVideo(env, video_dir, episode_trigger=lambda _: True, disable_logger=True)
    key, returns = jax.random.PRNGKey(seed), []
    for episode in range(episodes):
        obs, _ = env.reset(seed=seed + episode)
        done = False
        while not done:
            key, k_act = jax.random.split(key)
            action, _ = select_action(model, params, obs, k_act, 0.0, budget, noise_std, discrete)
            obs, _, terminated, truncated, info = env.step(np.asarray(action))
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


def main(args: Args) -> None:
    check_args(args)
    env = make_env(args.env_id, args.seed)
    action_dim = env.action_space.shape[0]
    model = QMLENetwork(action_dim, args.num_bins)
    greedy_budget = Budget.split(args.m_greedy, args.rho_uniform, args.rho_delta, args.rho_categorical)
    target_budget = Budget.split(args.m_target, args.rho_uniform, args.rho_delta, args.rho_categorical)
    key, k_init = jax.random.split(jax.random.PRNGKey(args.seed))
    obs, _ = env.reset(seed=args.seed)
    params = jax.jit(model.init)(k_init, obs[None], jnp.zeros((1, 1, action_dim)))  # one compile, not op by op

    if args.load_model is not None:
        with open(args.load_model, "rb") as f:
            params = flax.serialization.from_bytes(params, f.read())
        returns = evaluate(model, params, args.env_id, args.seed, args.eval_episodes, greedy_budget,
                           args.delta_noise_std)
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
    columns = ["charts/episodic_return", "charts/episodic_length", "charts/SPS", "losses/td_loss",
               "losses/delta_mle_loss", "losses/categorical_mle_loss", "losses/q_values",
               *(f"argmax/greedy_{s}" for s in SOURCES[:-1]), *(f"argmax/target_{s}" for s in SOURCES),
               "eval/episodic_return"]
    logger = MetricsLogger(os.path.join(run_dir, "metrics.csv"), columns, wandb_run)
    print(f"{run_name}: {action_dim} action dims, greedy budget {greedy_budget}, target budget {target_budget}")

    state = QMLEState.create(apply_fn=model.apply, params=params, target_params=params,
                             tx=optax.adam(args.learning_rate))
    transition = dict(obs=obs, action=np.zeros(action_dim, np.float32), reward=np.float32(0.0), next_obs=obs,
                      terminated=np.float32(0.0), argmax=np.zeros(action_dim, np.float32))
    buffer = buffer_init(transition, args.buffer_size)
    pending = {k: np.zeros((args.train_frequency, *np.shape(v)), np.float32) for k, v in transition.items()}
    store = jax.jit(buffer_add, donate_argnums=0)
    train = functools.partial(
        update, model, gamma=args.gamma, batch_size=args.batch_size, budget=target_budget,
        noise_std=args.delta_noise_std, prioritized=args.prioritized_replay, alpha=args.priority_exponent,
        beta=args.importance_exponent, priority_epsilon=args.priority_epsilon)
    greedy_edges = np.cumsum(greedy_budget)
    greedy_wins, train_metrics, last_return = np.zeros(len(SOURCES) - 1), {}, float("nan")  # acting has no cache
    start_time = time.time()

    for global_step in range(1, args.total_timesteps + 1):
        discrete = global_step <= args.discrete_steps
        key, k_act, k_update = jax.random.split(key, 3)
        action, best = select_action(model, state.params, obs, k_act, args.epsilon, greedy_budget,
                                     args.delta_noise_std, discrete)
        action, best = np.asarray(action), int(best)
        if best >= 0:
            greedy_wins[np.searchsorted(greedy_edges, best, side="right")] += 1
        next_obs, reward, terminated, truncated, info = env.step(action)

        # A time-limit end is not terminal: the target bootstraps through it (partial-episode bootstrapping).
        slot = (global_step - 1) % args.train_frequency
        for k, v in dict(obs=obs, action=action, reward=reward, next_obs=next_obs, terminated=terminated,
                         argmax=action).items():
            pending[k][slot] = v
        obs = next_obs
        if terminated or truncated:
            logger.log(global_step, {"charts/episodic_return": info["episode"]["r"],
                                     "charts/episodic_length": info["episode"]["l"]})
            last_return = float(info["episode"]["r"])
            obs, _ = env.reset()

        if slot == args.train_frequency - 1:
            # A copy: on CPU, jax may read a numpy argument in place after the call has returned (asynchronous
            # dispatch), and `pending` is overwritten from the next step on.
            chunk = {k: v.copy() for k, v in pending.items()}
            if global_step >= args.learning_starts:
                state, buffer, train_metrics = train(state, buffer, chunk, k_update, discrete=discrete)
            else:
                buffer = store(buffer, chunk)
        if global_step % args.target_network_frequency == 0:
            state = state.replace(target_params=state.params)

        if global_step % args.log_frequency == 0:
            sps = global_step / (time.time() - start_time)
            acting = {f"argmax/greedy_{s}": n / max(greedy_wins.sum(), 1) for s, n in zip(SOURCES, greedy_wins)}
            logger.log(global_step, {"charts/SPS": sps, **acting, **train_metrics})
            greedy_wins[:] = 0
            print(f"step {global_step:>8}  return {last_return:8.1f}  SPS {sps:.0f}", flush=True)
        if args.eval_frequency and (global_step % args.eval_frequency == 0 or global_step == args.total_timesteps):
            video_dir = os.path.join(run_dir, "videos", f"step{global_step}") if args.capture_video else None
            returns = evaluate(model, state.params, args.env_id, args.seed + 10_000, args.eval_episodes,
                               greedy_budget, args.delta_noise_std, discrete, video_dir)
            logger.log(global_step, {"eval/episodic_return": np.mean(returns)})
            print(f"step {global_step:>8}  greedy evaluation return {np.mean(returns):.1f}", flush=True)

    if args.save_model:
        path = os.path.join(run_dir, f"{args.exp_name}.flax")
        with open(path, "wb") as f:
            f.write(flax.serialization.to_bytes(state.params))
        print(f"model saved to {path}")
    logger.close()
    env.close()
    if wandb_run is not None:
        wandb_run.finish()


if __name__ == "__main__":
    main(tyro.cli(Args))
