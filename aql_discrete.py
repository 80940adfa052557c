"""AQL: amortized Q-learning over a product of discrete sub-actions, on DeepMind Control and Gymnasium.

Every action dimension is cut into --num-bins bins (a Discrete(n) space is one dimension of n bins). max_a Q(s, a) of
an action-in Q network is taken over N samples of a learned proposal, autoregressive over sub-actions, and M uniform
samples; the proposal learns by maximum likelihood toward that arg-max, with an entropy bonus, so the search amortises
itself (--n-proposal 0: the UniformQL baseline). Van de Wiele, Warde-Farley, Mnih, Mnih, "Q-Learning in enormous
action spaces via amortized approximate maximization", arXiv 2001.08116 (N = 100, M = 400); docs/aql_discrete.md.

    python aql_discrete.py --env-id humanoid-walk   # the headline: 21 action dimensions, 11^21 actions
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
    env_id: str = "walker-walk"  # DeepMind Control `domain-task` (humanoid-walk), or a Box/Discrete Gymnasium id
    total_timesteps: int = 100_000  # environment steps to train for
    learning_rate: float = 5e-4  # Adam step size, shared by the Q network and the proposal
    buffer_size: int = 1_000_000  # replay memory capacity in transitions
    gamma: float = 0.99  # discount factor
    batch_size: int = 256  # transitions per update
    learning_starts: int = 1000  # environment steps before the first update
    train_frequency: int = 10  # environment steps between updates
    target_network_frequency: int = 200  # environment steps between hard copies of Q and proposal into the target
    epsilon: float = 0.1  # probability of a uniformly random action while training
    prioritized_replay: bool = True  # proportional prioritised replay (--no-prioritized-replay: uniform)
    priority_exponent: float = 0.6  # alpha: how strongly priorities skew sampling
    importance_exponent: float = 0.2  # beta: strength of the importance-sampling correction
    priority_epsilon: float = 1e-6  # added to |TD error|, so that no transition has zero priority
    num_bins: int = 11  # bins per Box action dimension on [-1, 1] (odd: 0 is a bin); unused for Discrete(n)
    n_proposal: int = 100  # N: proposal samples per state in every arg-max search (0: UniformQL, no proposal)
    m_uniform: int = 400  # M: uniform samples per state in every arg-max search
    entropy_coef: float = 0.1  # weight of the proposal's entropy bonus (keeps it from collapsing between targets)
    proposal_hidden: int = 128  # width of the proposal's hidden layer
    amortisation_states: int = 256  # batch states (at most all) the gap is measured on before each log (0: never)

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


# ---- the algorithm: network, proposal, search, update ----
def elu(x):  # through exp, not expm1: equal in float32 and twice as fast on XLA's CPU backend
    return jnp.where(x > 0, x, jnp.exp(jnp.minimum(x, 0.0)) - 1.0)


# PyTorch's nn.Linear weight scale, U(+-1/sqrt(fan_in)), as in the authors' QMLE release (Flax's LeCun normal learned
# walker-walk slower); biases start at zero, each half of the split joint layer at its own fan-in.
Dense = functools.partial(nn.Dense, kernel_init=nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform"))


class ResidualBlock(nn.Module):  # x + W2 relu(W1 x), the release's form (a pre-activation ReLU learned slower)
    features: int

    @nn.compact
    def __call__(self, x):
        h = Dense(self.features)(x)  # Dense_0, made before Dense_1: the names hold the parameters
        return x + Dense(self.features)(nn.relu(h))


EMBEDDING = 128  # width of the observation stream that Q and the proposal share


class AutoregressiveProposal(nn.Module):
    """mu(a | s) = prod_d softmax(logits_d), an MLP of one hidden layer on [e(s), one-hot(a_<d), one-hot(d)]. Its first
    layer is linear in the one-hots: sampling adds one kernel row per chosen sub-action, and teacher forcing sums
    the rows over exclusive prefixes to get all D conditionals in one pass."""

    action_dim: int
    num_bins: int
    hidden: int

    def setup(self):
        dim, bins, hidden = self.action_dim, self.num_bins, self.hidden
        init = nn.initializers.normal(stddev=(EMBEDDING + dim * bins + dim) ** -0.5)  # LeCun, whole input
        self.state_in = nn.Dense(hidden, kernel_init=init)
        self.chosen_in = self.param("chosen_in", init, (dim, bins, hidden))  # first-layer rows of one-hot(a_<d)
        self.dim_in = self.param("dim_in", init, (dim, hidden))  # first-layer rows of one-hot(d)
        # A zero output layer: the first proposal is uniform, so AQL starts as UniformQL and leaves it as targets pull.
        self.out_kernel = self.param("out_kernel", nn.initializers.zeros, (dim, hidden, bins))
        self.out_bias = self.param("out_bias", nn.initializers.zeros, (dim, bins))

    def sample(self, embedding, key, n: int):  # [B, E] -> n actions per state [B, n, D], their log-probabilities [B, n]
        base = self.state_in(embedding)
        pre = jnp.broadcast_to(base[:, None, :], (base.shape[0], n, self.hidden))
        uniforms = jax.random.uniform(key, (self.action_dim, base.shape[0], n, 1))

        def step(pre, xs):
            dim_row, chosen_rows, kernel, bias, u = xs
            log_p = jax.nn.log_softmax(nn.relu(pre + dim_row) @ kernel + bias)  # [B, n, bins]
            # Inverse CDF: one uniform per sub-action, Gumbel-max's distribution for 1/bins of its random bits.
            choice = (u > jnp.cumsum(jnp.exp(log_p), -1)[..., :-1]).sum(-1)
            chosen_log_p = jnp.take_along_axis(log_p, choice[..., None], -1)[..., 0]
            return pre + chosen_rows[choice], (choice, chosen_log_p)  # the choice conditions what follows

        xs = (self.dim_in, self.chosen_in, self.out_kernel, self.out_bias, uniforms)
        _, (choices, log_ps) = jax.lax.scan(step, pre, xs)
        return jnp.moveaxis(choices, 0, -1).astype(jnp.int32), log_ps.sum(0)

    def log_prob(self, embedding, actions):
        """Teacher forcing: [B, E], [B, k, D] -> log mu(a | s) [B, k], and the entropies of the conditionals along a's
        prefix, summed over d [B, k] (the joint's has no closed form; exact for D = 1 and independent sub-actions)."""
        rows = self.chosen_in[jnp.arange(self.action_dim), actions]  # [B, k, D, hidden]
        before = jnp.cumsum(rows, axis=-2)[..., :-1, :]  # row d: the sub-actions chosen before d
        before = jnp.concatenate([jnp.zeros_like(rows[..., :1, :]), before], axis=-2)
        pre = self.state_in(embedding)[:, None, None, :] + self.dim_in + before
        logits = jnp.einsum("bkdh,dhn->bkdn", nn.relu(pre), self.out_kernel) + self.out_bias
        log_p = jax.nn.log_softmax(logits)
        chosen = jnp.take_along_axis(log_p, actions[..., None], -1)[..., 0].sum(-1)
        return chosen, -(jnp.exp(log_p) * log_p).sum((-2, -1))


class AQLNetwork(nn.Module):
    """qmle_dmc.py's action-in Q network (QMLE paper, Appendix B.1), the action entering as its bins' values in [-1, 1],
    and the proposal, which reads the observation stream through a stop_gradient: only the TD loss shapes it. The
    stream and the observation half of the split joint layer are computed once per state."""

    action_dim: int
    num_bins: int
    proposal_hidden: int = 128

    def setup(self):
        self.obs_embed, self.obs_block, self.obs_norm = Dense(EMBEDDING), ResidualBlock(EMBEDDING), nn.LayerNorm()
        self.act_embed, self.act_norm = Dense(128), nn.LayerNorm()
        self.joint_in_obs, self.joint_in_act = Dense(256), Dense(256, use_bias=False)
        self.joint_out, self.joint_norm, self.q_head = Dense(256), nn.LayerNorm(), Dense(1)
        self.proposal = AutoregressiveProposal(self.action_dim, self.num_bins, self.proposal_hidden)

    def __call__(self, obs, actions):  # [B, obs_dim], [B, k, D]: creates every parameter
        embedding = self.observation_stream(obs)
        return self.q_values(embedding, actions), self.proposal_log_prob(embedding, actions)

    def observation_stream(self, obs):  # [..., obs_dim] -> [..., 128]
        return elu(self.obs_norm(self.obs_block(self.obs_embed(obs))))

    def q_values(self, embedding, actions):  # [..., 128], [..., M, D] bin indices -> [..., M]
        a = elu(self.act_norm(self.act_embed(jnp.linspace(-1.0, 1.0, self.num_bins)[actions])))
        h = self.joint_out(nn.relu(self.joint_in_obs(embedding)[..., None, :] + self.joint_in_act(a)))
        x = jnp.concatenate([jnp.broadcast_to(embedding[..., None, :], a.shape), a], axis=-1)
        return self.q_head(elu(self.joint_norm(x + h)))[..., 0]

    def proposal_sample(self, embedding, key, n: int):
        return self.proposal.sample(jax.lax.stop_gradient(embedding), key, n)

    def proposal_log_prob(self, embedding, actions):
        return self.proposal.log_prob(jax.lax.stop_gradient(embedding), actions)


def uniform_actions(key, shape: tuple, num_bins: int) -> jax.Array:  # randint's distribution, one uniform each
    return jnp.minimum(num_bins * jax.random.uniform(key, shape), num_bins - 1).astype(jnp.int32)


def sample_candidates(model: AQLNetwork, params, embedding, key, n_proposal: int, m_uniform: int):
    """Each state's search set, N proposal samples first, then M uniform: [B, 128] -> [B, N + M, D]."""
    k_proposal, k_uniform = jax.random.split(key)
    uniform = uniform_actions(k_uniform, (embedding.shape[0], m_uniform, model.action_dim), model.num_bins)
    if n_proposal == 0:  # UniformQL: the proposal is never sampled (nor trained)
        return uniform
    proposal, _ = model.apply(params, embedding, k_proposal, n_proposal, method=AQLNetwork.proposal_sample)
    return jnp.concatenate([proposal, uniform], axis=1)


CHUNK_STATES = 8  # states whose candidates' activations are computed together (q_over_candidates)


def q_over_candidates(model: AQLNetwork, params, embedding, candidates, states_per_chunk: int = CHUNK_STATES):
    """Q of every candidate of every state, [B, 128], [B, M, D] -> [B, M], up to 8 states at a time (fastest on a
    CPU). Where the whole action space is no larger than a state's candidates (CartPole, 1-D cartpole-swingup), Q of
    each action once, gathered: the same values at a fraction of the cost."""
    batch, space = embedding.shape[0], (model.num_bins,) * model.action_dim
    if math.prod(space) <= candidates.shape[1]:  # Python ints: 11^38 overflows int64
        every_action = jnp.stack(jnp.unravel_index(jnp.arange(math.prod(space)), space), -1)  # [|A|, D]
        every_action = jnp.broadcast_to(every_action, (batch, *every_action.shape))
        q_table = model.apply(params, embedding, every_action, method=AQLNetwork.q_values)
        flat = jnp.ravel_multi_index(tuple(jnp.moveaxis(candidates, -1, 0)), space, mode="clip")
        return jnp.take_along_axis(q_table, flat, axis=1)
    chunk = np.gcd(batch, states_per_chunk)
    chunks = [x.reshape(batch // chunk, chunk, *x.shape[1:]) for x in (embedding, candidates)]
    return jax.lax.map(lambda xs: model.apply(params, *xs, method=AQLNetwork.q_values), chunks).reshape(batch, -1)


def search_argmax(model: AQLNetwork, params, obs, key, n_proposal: int, m_uniform: int):
    """The arg-max over the sampled set: [B, obs_dim] -> (action [B, D], its Q [B], its index [B])."""
    embedding = model.apply(params, obs, method=AQLNetwork.observation_stream)
    candidates = sample_candidates(model, params, embedding, key, n_proposal, m_uniform)
    q = q_over_candidates(model, params, embedding, candidates)
    best = q.argmax(axis=1)
    return jnp.take_along_axis(candidates, best[:, None, None], axis=1)[:, 0], q.max(axis=1), best


def amortisation_gap(model: AQLNetwork, params, obs, key, n_proposal: int, m_uniform: int):
    """Per state, max Q over N proposal + M uniform samples minus max Q over N + M uniform ones: what the proposal adds
    over spending its samples on uniform search. [B, obs_dim] -> [B]."""
    k_amortised, k_uniform = jax.random.split(key)
    _, amortised, _ = search_argmax(model, params, obs, k_amortised, n_proposal, m_uniform)
    return amortised - search_argmax(model, params, obs, k_uniform, 0, n_proposal + m_uniform)[1]


@functools.partial(jax.jit, static_argnames=("model", "n_proposal", "m_uniform"), donate_argnames=("greedy",))
def act(model: AQLNetwork, params, obs, key, greedy, epsilon, n_proposal: int, m_uniform: int):
    """The search's arg-max, or with probability epsilon a uniform action (bin indices), for N states: the loop's one
    device call per step. Also the next keys, and greedy [2] += [greedy actions, of them a proposal sample's]."""
    key, k_act, k_update = jax.random.split(key, 3)
    k_search, k_explore, k_random = jax.random.split(k_act, 3)
    action, _, best = search_argmax(model, params, obs, k_search, n_proposal, m_uniform)
    explore = jax.random.uniform(k_explore, best.shape) < epsilon
    actions = jnp.where(explore[:, None], uniform_actions(k_random, action.shape, model.num_bins), action)
    counts = jnp.stack([jnp.sum(~explore), jnp.sum(~explore & (best < n_proposal))])
    return actions, key, k_update, greedy + counts


UpdateConfig = collections.namedtuple(
    "UpdateConfig",
    """updates amortisation_states gamma batch_size n_proposal m_uniform entropy_coef prioritized_replay
    priority_exponent importance_exponent priority_epsilon""",
)  # the update's settings: one static argument


class AQLState(TrainState):  # apply_fn unused (None): the model is passed to each jitted function
    target_params: Any


@functools.cache
def adam(learning_rate: float):  # one optimizer per rate, so that a second run in one process compiles nothing
    return optax.adam(learning_rate)


def gradient_step(model: AQLNetwork, state: AQLState, buffer, key, cfg: UpdateConfig):
    """One replay step: the target networks' search at each s' gives the TD target and the proposal's label; one Adam
    step on the importance-weighted TD loss plus the proposal's negative log-likelihood minus its entropy bonus. The
    amortisation gap is measured on cfg.amortisation_states replayed states, spread over the batch."""
    k_sample, k_target, k_gap = jax.random.split(key, 3)
    index, batch, weights = buffer_sample(
        buffer, k_sample, cfg.batch_size, cfg.prioritized_replay, cfg.importance_exponent
    )
    # Target Q and target proposal: the target stays put between copies, like a DQN target.
    next_argmax, next_q, best = search_argmax(
        model, state.target_params, batch["next_obs"], k_target, cfg.n_proposal, cfg.m_uniform
    )
    td_target = batch["reward"] + cfg.gamma * (1.0 - batch["terminated"]) * next_q

    def loss_fn(params):
        embedding = model.apply(params, batch["obs"], method=AQLNetwork.observation_stream)
        q = model.apply(params, embedding, batch["action"][:, None], method=AQLNetwork.q_values)[:, 0]
        td_error = td_target - q
        td_loss = jnp.mean(weights * td_error**2)
        if cfg.n_proposal == 0:  # UniformQL
            return td_loss, (td_loss, jnp.nan, jnp.nan, td_error, q)
        embedding = model.apply(params, batch["next_obs"], method=AQLNetwork.observation_stream)
        log_prob, entropy = model.apply(params, embedding, next_argmax[:, None], method=AQLNetwork.proposal_log_prob)
        nll, entropy = -log_prob.mean(), entropy.mean()
        return td_loss + nll - cfg.entropy_coef * entropy, (td_loss, nll, entropy, td_error, q)

    grads, (td_loss, nll, entropy, td_error, q) = jax.grad(loss_fn, has_aux=True)(state.params)
    priority = jnp.abs(td_error) + cfg.priority_epsilon if cfg.prioritized_replay else None
    buffer = buffer_update(buffer, index, priority, cfg.priority_exponent)
    from_proposal = jnp.mean(best < cfg.n_proposal)  # proposal samples come first: they win ties
    metrics = {"losses/td_loss": td_loss, "losses/q_values": q.mean(), "charts/argmax_from_proposal": from_proposal}
    if cfg.n_proposal > 0:
        metrics.update({"losses/proposal_nll": nll, "losses/entropy": entropy})
    if cfg.amortisation_states > 0:  # online Q and proposal
        states = batch["obs"][:: max(cfg.batch_size // cfg.amortisation_states, 1)][: cfg.amortisation_states]
        gap = amortisation_gap(model, state.params, states, k_gap, cfg.n_proposal, cfg.m_uniform)
        metrics.update({"charts/amortisation_gap": gap.mean(), "charts/amortisation_win_fraction": jnp.mean(gap > 0)})
    return state.apply_gradients(grads=grads), buffer, metrics


@functools.partial(jax.jit, static_argnames=("model", "cfg"), donate_argnames=("buffer",))
def update(model: AQLNetwork, state: AQLState, buffer, new_transitions, key, cfg: UpdateConfig):
    """The loop's device call per replay period: store the transitions gathered since the last one, then take
    cfg.updates gradient steps (none before --learning-starts), the last one measuring the gap where asked to."""
    buffer = buffer_add(buffer, new_transitions)
    if cfg.updates <= 1:  # one step takes the key itself: one environment reproduces its single-environment run
        return gradient_step(model, state, buffer, key, cfg) if cfg.updates else (state, buffer, {})
    plain, keys = cfg._replace(amortisation_states=0), jax.random.split(key, cfg.updates)

    def step(carry, k):
        state, buffer, metrics = gradient_step(model, *carry, k, plain)
        return (state, buffer), metrics

    (state, buffer), metrics = jax.lax.scan(step, (state, buffer), keys[:-1] if cfg.amortisation_states else keys)
    if cfg.amortisation_states:  # the gap costs two more searches per state: measured by the call's last step only
        return gradient_step(model, state, buffer, keys[-1], cfg)
    return state, buffer, jax.tree.map(lambda m: m[-1], metrics)


def evaluate(policy, params, args, label: str, num_bins: int, video_dir: Optional[str] = None) -> float:
    """Mean greedy return (epsilon 0) over --eval-episodes episodes of a fresh environment reset with seeds --seed +
    10000, + 10001, ..., printed after `label` (--load-model thus scores a model as its run did)."""
    seed, env = args.seed + 10_000, make_env(args.env_id, args.seed + 10_000, video_dir)
    key, greedy, returns = jax.random.PRNGKey(seed), jnp.zeros(2), []
    for episode in range(args.eval_episodes):
        obs, _ = env.reset(seed=seed + episode)
        done = False
        while not done:
            action, key, _, greedy = policy(params, obs[None], key, greedy, 0.0)
            obs, _, terminated, truncated, info = env.step(
                env_action(env.action_space, np.asarray(action[0]), num_bins)
            )
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
    """A DeepMind Control or Gymnasium task with flat float32 observations, and Box actions rescaled to [-1, 1]."""
    env = checked_env(env_id, video_dir)
    if isinstance(env.action_space, gym.spaces.Box) and len(env.action_space.shape) == 1:
        env = gym.wrappers.RescaleAction(env, -1.0, 1.0)  # the bins are evenly spaced on [-1, 1]
    elif not isinstance(env.action_space, gym.spaces.Discrete):
        fail(f"--env-id {env_id!r} has {env.action_space} actions; {SCRIPT} needs a one-dimensional Box or a Discrete")
    env = gym.wrappers.RecordEpisodeStatistics(env)
    env.action_space.seed(seed)
    return env


def sub_action_space(env: gym.Env, num_bins: int) -> tuple:  # (D, bins): a Discrete(n) is one dimension of n bins
    discrete = isinstance(env.action_space, gym.spaces.Discrete)
    return (1, int(env.action_space.n)) if discrete else (env.action_space.shape[0], num_bins)


def env_action(space: gym.Space, index: np.ndarray, num_bins: int) -> np.ndarray:
    """Bin indices [..., D] -> what one environment's `space` takes: the bins' values [..., D], or Discrete actions."""
    if isinstance(space, gym.spaces.Discrete):
        return space.start + index[..., 0]
    return np.linspace(-1.0, 1.0, num_bins, dtype=np.float32)[index]


def proposal_bytes(action_dim: int, num_bins: int, args: Args) -> int:
    """An update's proposal memory: its per-bin weights five times (online, target, gradient, Adam's two moments) and
    one sub-action's [batch, N, bins] draw in the target search (logits, log-softmax, probabilities, CDF)."""
    weights = 5 * action_dim * num_bins * (2 * args.proposal_hidden + 1)
    return 4 * (weights + 4 * args.batch_size * max(args.n_proposal, 1) * num_bins)


def check_searches(args: Args, action_dim: int, num_bins: int) -> None:
    """Refuse an update whose proposal cannot fit, or a search that cannot, counting less than XLA allocates: 3 int32
    copies of its candidates and 4 of a chunk's 256 hidden units (for --batch-size states; --load-model acts on one)."""
    if not args.load_model:
        proposal = f"--n-proposal {args.n_proposal:,}, --num-bins {args.num_bins}: the proposal in an update"
        check_fits(proposal, proposal_bytes(action_dim, num_bins, args))
    m, states = args.n_proposal + args.m_uniform, 1 if args.load_model else max(args.num_envs, args.batch_size)
    need = 12 * states * m * action_dim + 16 * 256 * m * min(states, CHUNK_STATES)
    check_fits(f"--n-proposal + --m-uniform {m:,} for {states:,} states of {action_dim} dims", need)


def check_args(args: Args) -> None:
    nonnegative = "n_proposal m_uniform entropy_coef amortisation_states"
    check_common(args, "target_network_frequency proposal_hidden", nonnegative, "")
    if args.num_bins < 2:
        fail(f"--num-bins must be >= 2, got {args.num_bins}")
    if args.n_proposal + args.m_uniform < 1:
        fail("--n-proposal + --m-uniform must be >= 1 (the arg-max needs a candidate), got 0")


MODEL_SETTINGS = ("env_id", "num_bins", "proposal_hidden")  # what a saved model's shapes and meaning depend on


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


METRICS = """charts/episodic_return charts/episodic_length charts/SPS losses/td_loss losses/proposal_nll losses/entropy
    losses/q_values charts/amortisation_gap charts/amortisation_win_fraction charts/argmax_from_proposal
    charts/greedy_from_proposal eval/episodic_return""".split()  # metrics.csv's columns, in this order


def main(args: Args) -> None:
    stop = STOP
    args, meta, saved = start(args)  # a Ctrl-C from here on stops the run after its current step
    check_args(args)
    env = make_env(args.env_id, args.seed)  # one error line here, not in a worker
    (example_obs, _), (action_dim, num_bins) = env.reset(seed=args.seed), sub_action_space(env, args.num_bins)
    if args.capture_video:
        checked_env(args.env_id, render=True).close()
    if args.resume and meta["global_step"] >= args.total_timesteps:
        return print(f"{args.resume} is at step {meta['global_step']}: a larger --total-timesteps continues it")
    envs = None if args.load_model else make_envs(args.env_id, args.seed, args.num_envs)  # forked before JAX starts
    check_searches(args, action_dim, num_bins)
    model = AQLNetwork(action_dim, num_bins, args.proposal_hidden)
    policy = functools.partial(act, model, n_proposal=args.n_proposal, m_uniform=args.m_uniform)
    key, k_init = jax.random.split(jax.random.PRNGKey(args.seed))
    init = jax.jit(AQLNetwork.init, static_argnums=0)  # keyed on the model's settings: a second run reuses it
    params = init(model, k_init, example_obs[None], jnp.zeros((1, 1, action_dim), jnp.int32))
    if args.load_model:  # its run's evaluation seeds and search: it scores what its run logged
        video_dir = args.capture_video and os.path.join(os.path.dirname(args.load_model), "videos", "evaluation")
        params = restore(params, saved, "--load-model")
        return evaluate(policy, params, args, f"{args.load_model} on {args.env_id}", num_bins, video_dir)

    transition = dict(obs=example_obs, action=np.zeros(action_dim, np.int32), reward=np.float32(0))
    transition.update(next_obs=example_obs, terminated=np.float32(0))
    row_bytes = sum(v.nbytes for v in transition.values()) + 16  # and its share of the sum-tree
    check_fits(f"--buffer-size {args.buffer_size}", args.buffer_size * row_bytes)
    rows = math.lcm(args.num_envs, args.train_frequency)  # transitions per update call
    cfg = UpdateConfig(rows // args.train_frequency, 0, *(getattr(args, k) for k in UpdateConfig._fields[2:]))
    cfgs = (cfg._replace(updates=0), cfg, cfg._replace(amortisation_states=args.amortisation_states))
    logger, global_step = Logger(args, METRICS, meta), meta["global_step"] if meta else 0
    print(f"{logger.run_dir}: {action_dim} sub-actions x {num_bins} bins; N={args.n_proposal}, M={args.m_uniform}")
    state = AQLState.create(apply_fn=None, params=params, target_params=params, tx=adam(args.learning_rate))
    pending = {k: np.zeros((rows, *np.shape(v)), np.asarray(v).dtype) for k, v in transition.items()}
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
        mean = evaluate(policy, state.params, args, f"step {global_step:>8}", num_bins, video_dir)
        logger.log(global_step, {"eval/episodic_return": mean})

    def crossed(period, ahead=0):  # whether the last vector step (moved `ahead`) passed a multiple of this period
        return period > 0 and (global_step + ahead) // period > previous // period

    obs, space = continued_envs(envs, run["envs"], args.seed), envs.single_action_space
    outcome, metrics, returns, last_log = "crashed", {}, [], (time.time(), global_step)
    print("compiling the greedy action (XLA) ...")
    try:
        while global_step < args.total_timesteps and not stop:
            actions, key, k_update, greedy = policy(state.params, obs, key, greedy, args.epsilon)
            actions = np.asarray(actions)  # the step's one transfer from the device
            next_obs, rewards, terminated, truncated, infos = envs.step(env_action(space, actions, num_bins))
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
                measure = crossed(args.log_frequency, rows - args.num_envs)  # the update before a log line: the gap
                if learn and not metrics:
                    print(f"step {global_step}: compiling the update ...")
                chunk = {k: v.copy() for k, v in pending.items()}  # jax may read numpy inputs after returning
                state, buffer, learned = update(model, state, buffer, chunk, k_update, cfgs[learn * (1 + measure)])
                metrics.update(learned)  # the last measured gap stays until the next measurement
            if crossed(args.target_network_frequency):
                state = state.replace(target_params=state.params)
            if crossed(args.log_frequency):
                now, (steps, proposal) = time.time(), np.asarray(greedy).tolist()
                sps = (global_step - last_log[1]) / (now - last_log[0])
                acting = {"charts/greedy_from_proposal": proposal / steps} if steps else {}
                logger.log(global_step, {"charts/SPS": sps, **acting, **metrics})
                eta = time.strftime("%H:%M:%S", time.gmtime((args.total_timesteps - global_step) / sps))
                mean, gap = np.mean(returns or np.nan), metrics.get("charts/amortisation_gap", np.nan)
                print(
                    f"step {global_step:>8}  return {mean:8.1f}  SPS {sps:4.0f}  ETA {eta}  amortisation gap {gap:.4f}"
                )
                greedy, last_log, returns = jnp.zeros(2), (now, global_step), []
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
