"""AQL: amortized Q-learning over a product of discrete sub-action sets, on DeepMind Control and Gymnasium.

Every action dimension is cut into --num-bins bins (a Gymnasium Discrete(n) space is one dimension of n bins),
so an action is a vector of D bin indices. An action-in Q network is maximised over a candidate set: N samples
of a learned proposal, autoregressive over sub-actions (each a softmax given the state and the sub-actions
drawn before it), and M uniform samples. The proposal is trained by maximum likelihood toward the arg-max over
that set, with an entropy bonus, so the search amortises itself; --n-proposal 0 is the UniformQL baseline.

Paper: Van de Wiele, Warde-Farley, Mnih, Mnih, "Q-Learning in enormous action spaces via amortized
approximate maximization", 2020 (arXiv 2001.08116): N = 100, M = 400. Headline run (21 action dimensions):

    python aql_discrete.py --env-id humanoid-walk
"""

import functools
import math
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
    """save the parameters to runs/{run_name}/aql_discrete.flax at the end"""
    load_model: Optional[str] = None
    """path of a saved model: evaluate it greedily for --eval-episodes episodes instead of training"""

    env_id: str = "walker-walk"
    """DeepMind Control id `domain-task` (e.g. humanoid-walk) or a Gymnasium id with Box or Discrete actions"""
    total_timesteps: int = 100_000
    """environment steps to train for"""
    learning_rate: float = 5e-4
    """Adam step size, shared by the Q network and the proposal"""
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
    """environment steps between hard copies of Q and proposal into the target"""
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

    num_bins: int = 11
    """bins per Box action dimension, evenly spaced on [-1, 1]; odd so that 0 (rest) is a bin, and 11 keeps the
    extremes +-1 at a resolution of 0.2 (ignored for Discrete(n) spaces, which have n)"""
    n_proposal: int = 100
    """N: proposal samples per state in every arg-max search (0 = UniformQL: no proposal at all)"""
    m_uniform: int = 400
    """M: uniform samples per state in every arg-max search"""
    entropy_coef: float = 0.1
    """weight of the proposal's entropy bonus: keeps it from collapsing onto one action between targets"""
    proposal_hidden: int = 128
    """width of the proposal's hidden layer (128, as QMLE's predictors)"""
    amortisation_states: int = 256
    """replayed states on which charts/amortisation_* are measured, by the update before each log line (0 = never)"""

    eval_frequency: int = 10_000
    """environment steps between greedy evaluations (0 = never)"""
    eval_episodes: int = 1
    """episodes per greedy evaluation"""
    log_frequency: int = 1000
    """environment steps between console and metrics lines"""


def check_args(args: Args) -> None:
    """Reject settings that would crash later or silently train something else."""
    at_least = dict(total_timesteps=1, batch_size=1, buffer_size=1, train_frequency=1, target_network_frequency=1,
                    num_bins=2, proposal_hidden=1, eval_episodes=1, log_frequency=1)
    at_least_zero = dict(learning_starts=0, eval_frequency=0, n_proposal=0, m_uniform=0, entropy_coef=0.0,
                         amortisation_states=0, priority_epsilon=0.0, priority_exponent=0.0, importance_exponent=0.0)
    for name, low in {**at_least, **at_least_zero}.items():
        if getattr(args, name) < low:
            fail(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}")
    for name in ("gamma", "epsilon"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            fail(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(args, name)}")
    if args.n_proposal + args.m_uniform < 1:
        fail("--n-proposal + --m-uniform must be >= 1 (the arg-max needs a candidate), got 0")
    if args.load_model is not None and not os.path.isfile(args.load_model):
        fail(f"--load-model: no such file: {args.load_model}")


def fail(message: str) -> None:
    raise SystemExit(f"error: {message}")


def dmc_gym_id(env_id: str) -> Optional[str]:
    """`walker-walk` -> `dm_control/walker-walk-v0` when it names a suite task, else None."""
    from dm_control import suite

    return f"dm_control/{env_id}-v0" if tuple(env_id.split("-", 1)) in suite.ALL_TASKS else None


def make_env(env_id: str, seed: int, render: bool = False) -> gym.Env:
    """A Gymnasium env with float32 flat observations; Box actions rescaled to [-1, 1]."""
    gym_id = dmc_gym_id(env_id) or env_id
    if gym_id not in gym.registry:
        from dm_control import suite

        dmc = ", ".join(f"{d}-{t}" for d, t in suite.ALL_TASKS)
        fail(f"unknown --env-id {env_id!r}; DeepMind Control ids: {dmc}; or any Gymnasium id with Box or "
             "Discrete actions")
    env = gym.make(gym_id, render_mode="rgb_array" if render else None)
    if not isinstance(env.action_space, (gym.spaces.Box, gym.spaces.Discrete)):
        fail(f"--env-id {env_id!r} has {type(env.action_space).__name__} actions; aql_discrete.py needs Box "
             "or Discrete")
    env = gym.wrappers.FlattenObservation(env)
    env = gym.wrappers.DtypeObservation(env, np.float32)
    if isinstance(env.action_space, gym.spaces.Box):
        env = gym.wrappers.RescaleAction(env, -1.0, 1.0)  # the bins below are evenly spaced on [-1, 1]
    env = gym.wrappers.RecordEpisodeStatistics(env)
    env.action_space.seed(seed)
    return env


def sub_action_space(env: gym.Env, num_bins: int) -> tuple:
    """(D, bins): a Box is D dimensions of `num_bins` bins each; a Discrete(n) is one dimension of n."""
    discrete = isinstance(env.action_space, gym.spaces.Discrete)
    return (1, int(env.action_space.n)) if discrete else (env.action_space.shape[0], num_bins)


def env_action(env: gym.Env, index: np.ndarray, num_bins: int):
    """Bin indices [D] -> what env.step takes: the bins' values in [-1, 1], or the Discrete action."""
    if isinstance(env.action_space, gym.spaces.Discrete):
        return int(env.action_space.start + index[0])
    return np.linspace(-1.0, 1.0, num_bins, dtype=np.float32)[index]


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
    """ELU through exp, not expm1: equal to float32 precision and twice as fast on XLA's CPU backend."""
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


EMBEDDING = 128  # width of the observation stream that Q and the proposal share


class AutoregressiveProposal(nn.Module):
    """mu(a | s) = prod_d softmax(logits_d(e(s), a_<d)) over the bins of sub-action d.

    logits_d is an MLP with one hidden layer on [e(s), one-hot(a_1 .. a_{d-1}) (zeros for dims >= d),
    one-hot(d)] whose output layer is indexed by d. The first layer is linear in the one-hots, so its
    pre-activation is a per-state part plus one kernel row per sub-action already chosen: sampling adds one
    row after each choice (O(hidden) per step instead of a matmul over D x bins inputs), and teacher forcing
    sums the target's rows over exclusive prefixes to get all D conditionals in one pass.
    """

    action_dim: int
    num_bins: int
    hidden: int

    def setup(self):
        dim, bins, hidden = self.action_dim, self.num_bins, self.hidden
        init = nn.initializers.normal(stddev=(EMBEDDING + dim * bins + dim) ** -0.5)  # LeCun, whole input
        self.state_in = nn.Dense(hidden, kernel_init=init)
        self.chosen_in = self.param("chosen_in", init, (dim, bins, hidden))  # first-layer rows of one-hot(a_<d)
        self.dim_in = self.param("dim_in", init, (dim, hidden))  # first-layer rows of one-hot(d)
        # A zero output layer makes the first proposal uniform: AQL starts as UniformQL and leaves it only as
        # far as the arg-max targets pull.
        self.out_kernel = self.param("out_kernel", nn.initializers.zeros, (dim, hidden, bins))
        self.out_bias = self.param("out_bias", nn.initializers.zeros, (dim, bins))

    def sample(self, embedding, key, n: int):
        """n actions per state, one sub-action at a time for all of them: [B, E] -> ([B, n, D] bin indices,
        their log-probabilities [B, n])."""
        base = self.state_in(embedding)
        pre = jnp.broadcast_to(base[:, None, :], (base.shape[0], n, self.hidden))
        uniforms = jax.random.uniform(key, (self.action_dim, base.shape[0], n, 1))

        def step(pre, xs):
            dim_row, chosen_rows, kernel, bias, u = xs
            log_p = jax.nn.log_softmax(nn.relu(pre + dim_row) @ kernel + bias)  # [B, n, bins]
            # Inverse CDF: one uniform per sub-action, the same distribution as Gumbel-max for 1/bins the bits.
            choice = (u > jnp.cumsum(jnp.exp(log_p), -1)[..., :-1]).sum(-1)
            chosen_log_p = jnp.take_along_axis(log_p, choice[..., None], -1)[..., 0]
            return pre + chosen_rows[choice], (choice, chosen_log_p)  # the choice now conditions what follows

        _, (choices, log_ps) = jax.lax.scan(
            step, pre, (self.dim_in, self.chosen_in, self.out_kernel, self.out_bias, uniforms))
        return jnp.moveaxis(choices, 0, -1).astype(jnp.int32), log_ps.sum(0)

    def log_prob(self, embedding, actions):
        """Teacher forcing: [B, E], [B, k, D] -> (log mu(a | s) [B, k], the conditionals' entropies along a's
        prefix, summed over d [B, k])."""
        rows = self.chosen_in[jnp.arange(self.action_dim), actions]  # [B, k, D, hidden]
        before = jnp.cumsum(rows, axis=-2)[..., :-1, :]  # row d: the sub-actions chosen before d
        before = jnp.concatenate([jnp.zeros_like(rows[..., :1, :]), before], axis=-2)
        pre = self.state_in(embedding)[:, None, None, :] + self.dim_in + before
        logits = jnp.einsum("bkdh,dhn->bkdn", nn.relu(pre), self.out_kernel) + self.out_bias
        log_p = jax.nn.log_softmax(logits)
        chosen = jnp.take_along_axis(log_p, actions[..., None], -1)[..., 0].sum(-1)
        return chosen, -(jnp.exp(log_p) * log_p).sum((-2, -1))


class AQLNetwork(nn.Module):
    """An action-in Q network (QMLE paper, Appendix B.1) and the proposal, sharing the observation stream.

    Q(s, a) = head(LN-ELU(joint_block(concat(obs_stream(s), action_stream(a))))). The action enters as its
    bins' values in [-1, 1], not as learned per-(dim, bin) embeddings: neighbouring bins of a torque act alike
    and the value input shares that between them, and the net stays qmle_dmc.py's, so the agents differ in
    the maximiser only. The stream is computed once per state, and the joint block's first layer is split
    into observation and action halves (the same linear map), so the former is a per-state product. The
    proposal reads the stream through a stop_gradient (as QMLE's predictors): only the TD loss shapes it.
    """

    action_dim: int
    num_bins: int
    proposal_hidden: int = 128

    def setup(self):
        self.obs_embed, self.obs_block, self.obs_norm = Dense(EMBEDDING), ResidualBlock(EMBEDDING), nn.LayerNorm()
        self.act_embed, self.act_norm = Dense(128), nn.LayerNorm()
        self.joint_in_obs, self.joint_in_act = Dense(256), Dense(256, use_bias=False)
        self.joint_out, self.joint_norm, self.q_head = Dense(256), nn.LayerNorm(), Dense(1)
        self.proposal = AutoregressiveProposal(self.action_dim, self.num_bins, self.proposal_hidden)

    def __call__(self, obs, actions):  # [B, obs_dim], [B, k, D]; used to create every parameter
        embedding = self.observation_stream(obs)
        return self.q_values(embedding, actions), self.proposal_log_prob(embedding, actions)

    def observation_stream(self, obs):  # [..., obs_dim] -> [..., 128]
        return elu(self.obs_norm(self.obs_block(self.obs_embed(obs))))

    def q_values(self, embedding, actions):  # [..., 128], [..., M, D] bin indices -> [..., M]
        a = elu(self.act_norm(self.act_embed(jnp.linspace(-1.0, 1.0, self.num_bins)[actions])))
        h = self.joint_in_obs(embedding)[..., None, :] + self.joint_in_act(a)
        h = self.joint_out(nn.relu(h))
        x = jnp.concatenate([jnp.broadcast_to(embedding[..., None, :], a.shape), a], axis=-1)
        return self.q_head(elu(self.joint_norm(x + h)))[..., 0]

    def proposal_sample(self, embedding, key, n: int):
        return self.proposal.sample(jax.lax.stop_gradient(embedding), key, n)

    def proposal_log_prob(self, embedding, actions):
        return self.proposal.log_prob(jax.lax.stop_gradient(embedding), actions)


def uniform_actions(key, shape: tuple, num_bins: int) -> jax.Array:
    """Uniform bin indices, by scaling one uniform each (the distribution of randint, fewer random bits)."""
    return jnp.minimum(num_bins * jax.random.uniform(key, shape), num_bins - 1).astype(jnp.int32)


def sample_candidates(model: AQLNetwork, params, embedding, key, n_proposal: int, m_uniform: int):
    """The search set of each state, N proposal samples first, then M uniform: [B, 128] -> [B, N + M, D]."""
    k_proposal, k_uniform = jax.random.split(key)
    uniform = uniform_actions(k_uniform, (embedding.shape[0], m_uniform, model.action_dim), model.num_bins)
    if n_proposal == 0:  # UniformQL: the proposal is never sampled (nor trained)
        return uniform
    proposal, _ = model.apply(params, embedding, k_proposal, n_proposal, method=AQLNetwork.proposal_sample)
    return jnp.concatenate([proposal, uniform], axis=1)


def q_over_candidates(model: AQLNetwork, params, embedding, candidates, states_per_chunk: int = 8):
    """Q of every candidate of every state: [B, 128], [B, M, D] -> [B, M]. A few states at a time (8 x 500
    candidates at the defaults): 25% faster on a CPU than one pass or 32-state chunks, and with more than one
    chunk XLA does not inline the loop, which costs seconds of compilation.

    When the whole action space has no more actions than a state has candidates (CartPole's 2, or 1-D
    cartpole-swingup's 11 bins against 500 samples), Q is evaluated once per distinct action and gathered:
    the same values and arg-max, at a fraction of the cost, since most samples are repeats."""
    batch = embedding.shape[0]
    space = (model.num_bins,) * model.action_dim
    if math.prod(space) <= candidates.shape[1]:  # Python ints: 11^38 overflows int64
        every_action = jnp.stack(jnp.unravel_index(jnp.arange(math.prod(space)), space), -1)  # [|A|, D]
        q_table = model.apply(params, embedding, jnp.broadcast_to(every_action, (batch, *every_action.shape)),
                              method=AQLNetwork.q_values)
        flat = jnp.ravel_multi_index(tuple(jnp.moveaxis(candidates, -1, 0)), space, mode="clip")
        return jnp.take_along_axis(q_table, flat, axis=1)
    chunk = np.gcd(batch, states_per_chunk)
    split = lambda x: x.reshape(batch // chunk, chunk, *x.shape[1:])  # noqa: E731
    q = jax.lax.map(lambda xs: model.apply(params, *xs, method=AQLNetwork.q_values),
                    (split(embedding), split(candidates)))
    return q.reshape(batch, -1)


def search_argmax(model: AQLNetwork, params, obs, key, n_proposal: int, m_uniform: int):
    """Approximate arg-max over the sampled set: [B, obs_dim] -> (action [B, D], its Q [B], its index [B])."""
    embedding = model.apply(params, obs, method=AQLNetwork.observation_stream)
    candidates = sample_candidates(model, params, embedding, key, n_proposal, m_uniform)
    q = q_over_candidates(model, params, embedding, candidates)
    best = q.argmax(axis=1)
    return jnp.take_along_axis(candidates, best[:, None, None], axis=1)[:, 0], q.max(axis=1), best


def amortisation_gap(model: AQLNetwork, params, obs, key, n_proposal: int, m_uniform: int):
    """Per state: max Q over (N proposal + M uniform) minus max Q over N + M uniform samples: what the
    proposal adds over spending its samples on uniform search. [B, obs_dim] -> [B]."""
    k_amortised, k_uniform = jax.random.split(key)
    _, amortised, _ = search_argmax(model, params, obs, k_amortised, n_proposal, m_uniform)
    return amortised - search_argmax(model, params, obs, k_uniform, 0, n_proposal + m_uniform)[1]


class AQLState(TrainState):
    target_params: Any


@functools.partial(jax.jit, static_argnames=("model", "n_proposal", "m_uniform"))
def select_action(model: AQLNetwork, params, obs, key, epsilon, n_proposal: int, m_uniform: int):
    """The arg-max over N proposal + M uniform samples for this state, or with prob. epsilon a uniform action.

    Returns (bin indices [D], index of the winning candidate (< N: a proposal sample), or -1 when random)."""
    k_search, k_explore, k_random = jax.random.split(key, 3)
    action, _, best = search_argmax(model, params, obs[None], k_search, n_proposal, m_uniform)
    random_action = uniform_actions(k_random, (model.action_dim,), model.num_bins)
    explore = jax.random.uniform(k_explore) < epsilon
    return jnp.where(explore, random_action, action[0]), jnp.where(explore, -1, best[0])


@functools.partial(jax.jit, static_argnames=("model", "batch_size", "n_proposal", "m_uniform", "entropy_coef",
                                             "prioritized", "alpha", "beta", "priority_epsilon",
                                             "amortisation_states"),
                   donate_argnames=("buffer",))
def update(model: AQLNetwork, state: AQLState, buffer: ReplayBuffer, new_transitions, key, *, gamma: float,
           batch_size: int, n_proposal: int, m_uniform: int, entropy_coef: float, prioritized: bool, alpha: float,
           beta: float, priority_epsilon: float, amortisation_states: int = 0):
    """One replay period as a single device call: store the steps taken since the last call, sample, search
    the arg-max at each s' with the target networks, write priorities back, take one Adam step on the TD loss
    and the proposal's maximum-likelihood loss, and measure the amortisation gap.
    """
    buffer = buffer_add(buffer, new_transitions)
    k_sample, k_target, k_gap = jax.random.split(key, 3)
    index, batch, weights = buffer_sample(buffer, k_sample, batch_size, prioritized, beta)
    # The target's search uses the target proposal and the target Q, so the target is a function of the target
    # parameters alone and stays put between copies (like a DQN target); its arg-max doubles as the
    # proposal's training label at s', which saves a second search of N + M candidates per state.
    next_argmax, next_q, best = search_argmax(model, state.target_params, batch["next_obs"], k_target,
                                              n_proposal, m_uniform)
    td_target = batch["reward"] + gamma * (1.0 - batch["terminated"]) * next_q

    def loss_fn(params):
        embedding = model.apply(params, batch["obs"], method=AQLNetwork.observation_stream)
        q = model.apply(params, embedding, batch["action"][:, None], method=AQLNetwork.q_values)[:, 0]
        td_error = td_target - q
        td_loss = jnp.mean(weights * td_error**2)
        if n_proposal == 0:  # UniformQL
            return td_loss, (td_loss, jnp.nan, jnp.nan, td_error, q)
        embedding = model.apply(params, batch["next_obs"], method=AQLNetwork.observation_stream)
        log_prob, entropy = model.apply(params, embedding, next_argmax[:, None], method=AQLNetwork.proposal_log_prob)
        # The joint entropy of an autoregressive model has no closed form; the conditionals' entropies along
        # the target's prefix are a cheap stand-in, exact for D = 1 and for independent sub-actions.
        nll, entropy = -log_prob.mean(), entropy.mean()
        return td_loss + nll - entropy_coef * entropy, (td_loss, nll, entropy, td_error, q)

    grads, (td_loss, nll, entropy, td_error, q) = jax.grad(loss_fn, has_aux=True)(state.params)
    buffer = buffer_update(buffer, index, jnp.abs(td_error) + priority_epsilon if prioritized else None, alpha)
    metrics = {"losses/td_loss": td_loss, "losses/q_values": q.mean(),  # proposals come first, so win ties
               "charts/argmax_from_proposal": jnp.mean(best < n_proposal)}
    if n_proposal > 0:
        metrics.update({"losses/proposal_nll": nll, "losses/entropy": entropy})
    if amortisation_states > 0:  # online Q and proposal, on replayed states spread over the whole batch
        states = batch["obs"][:: max(batch_size // amortisation_states, 1)][:amortisation_states]
        gap = amortisation_gap(model, state.params, states, k_gap, n_proposal, m_uniform)
        metrics.update({"charts/amortisation_gap": gap.mean(), "charts/amortisation_win_fraction": jnp.mean(gap > 0)})
    return state.apply_gradients(grads=grads), buffer, metrics


def evaluate(model, params, env_id: str, seed: int, episodes: int, n_proposal: int, m_uniform: int,
             video_dir: Optional[str] = None) -> list:
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
            action, _ = select_action(model, params, obs, k_act, 0.0, n_proposal, m_uniform)
            obs, _, terminated, truncated, info = env.step(env_action(env, np.asarray(action), model.num_bins))
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
    action_dim, num_bins = sub_action_space(env, args.num_bins)
    model = AQLNetwork(action_dim, num_bins, args.proposal_hidden)
    search = dict(n_proposal=args.n_proposal, m_uniform=args.m_uniform)
    key, k_init = jax.random.split(jax.random.PRNGKey(args.seed))
    obs, _ = env.reset(seed=args.seed)
    params = jax.jit(model.init)(k_init, obs[None], jnp.zeros((1, 1, action_dim), jnp.int32))  # one compile

    if args.load_model is not None:
        with open(args.load_model, "rb") as f:
            params = flax.serialization.from_bytes(params, f.read())
        returns = evaluate(model, params, args.env_id, args.seed, args.eval_episodes, **search)
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
               "losses/proposal_nll", "losses/entropy", "losses/q_values", "charts/amortisation_gap",
               "charts/amortisation_win_fraction", "charts/argmax_from_proposal", "charts/greedy_from_proposal",
               "eval/episodic_return"]
    logger = MetricsLogger(os.path.join(run_dir, "metrics.csv"), columns, wandb_run)
    print(f"{run_name}: {action_dim} sub-actions x {num_bins} bins ({float(num_bins) ** action_dim:.3g} actions), "
          f"search over N={args.n_proposal} proposal + M={args.m_uniform} uniform samples")

    state = AQLState.create(apply_fn=model.apply, params=params, target_params=params,
                            tx=optax.adam(args.learning_rate))
    transition = dict(obs=obs, action=np.zeros(action_dim, np.int32), reward=np.float32(0.0), next_obs=obs,
                      terminated=np.float32(0.0))
    buffer = buffer_init(transition, args.buffer_size)
    pending = {k: np.zeros((args.train_frequency, *np.shape(v)), np.asarray(v).dtype) for k, v in transition.items()}
    store = jax.jit(buffer_add, donate_argnums=0)
    train = functools.partial(
        update, model, gamma=args.gamma, batch_size=args.batch_size, entropy_coef=args.entropy_coef,
        prioritized=args.prioritized_replay, alpha=args.priority_exponent, beta=args.importance_exponent,
        priority_epsilon=args.priority_epsilon, **search)
    # The gap costs two more searches per measured state, so only the update before a log line measures it.
    train_and_measure = functools.partial(train, amortisation_states=args.amortisation_states)
    greedy_steps, greedy_proposal, train_metrics, last_return = 0, 0, {}, float("nan")
    start_time = time.time()

    for global_step in range(1, args.total_timesteps + 1):
        key, k_act, k_update = jax.random.split(key, 3)
        action, best = select_action(model, state.params, obs, k_act, args.epsilon, **search)
        action, best = np.asarray(action), int(best)
        if best >= 0:
            greedy_steps, greedy_proposal = greedy_steps + 1, greedy_proposal + (best < args.n_proposal)
        next_obs, reward, terminated, truncated, info = env.step(env_action(env, action, num_bins))

        # A time-limit end is not terminal: the target bootstraps through it (partial-episode bootstrapping).
        slot = (global_step - 1) % args.train_frequency
        for k, v in dict(obs=obs, action=action, reward=reward, next_obs=next_obs, terminated=terminated).items():
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
                measure = args.amortisation_states > 0 and global_step % args.log_frequency < args.train_frequency
                state, buffer, metrics = (train_and_measure if measure else train)(state, buffer, chunk, k_update)
                train_metrics.update(metrics)  # the last measured gap stays until the next measurement
            else:
                buffer = store(buffer, chunk)
        if global_step % args.target_network_frequency == 0:
            state = state.replace(target_params=state.params)

        if global_step % args.log_frequency == 0:
            sps = global_step / (time.time() - start_time)
            acting = {"charts/greedy_from_proposal": greedy_proposal / greedy_steps} if greedy_steps else {}
            logger.log(global_step, {"charts/SPS": sps, **acting, **train_metrics})
            greedy_steps, greedy_proposal = 0, 0
            gap = float(train_metrics.get("charts/amortisation_gap", np.nan))
            print(f"step {global_step:>8}  return {last_return:8.1f}  SPS {sps:.0f}  amortisation gap {gap:.4f}",
                  flush=True)
        if args.eval_frequency and (global_step % args.eval_frequency == 0 or global_step == args.total_timesteps):
            video_dir = os.path.join(run_dir, "videos", f"step{global_step}") if args.capture_video else None
            returns = evaluate(model, state.params, args.env_id, args.seed + 10_000, args.eval_episodes, **search,
                               video_dir=video_dir)
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
