"""Speed of the agents at their paper defaults, on whatever device JAX finds (CPU, GPU or TPU).

For each agent, task and number of environments N, in one process:

- the training loop's steps per second (environment steps, all N counted), cumulative from the start of the
  loop with compilation in it (how the authors' release prints it) and after compilation (the steady rate);
- the physics alone at the same N (random actions through the same vector env): the ceiling of any agent;
- one environment step split into its parts: physics, the greedy action (the loop's one device call per
  vector step, its transfer included), the update's share (one update call per lcm(N, train_frequency)
  steps), and the rest (Python, logging, copies), which is what the steady rate leaves over;
- the FLOP-bound rate: one step's floating-point work counted from the architecture (greedy action plus a
  tenth of an update), at the rate this machine reaches on a dense float32 matmul of the update's largest
  shape (25,856 x 256 x 256), measured in the same run (its fastest call: the rate the machine can reach). The
  steady rate over it is how close the loop gets to what its arithmetic allows on this device. Beside it, the
  same bound with the physics' measured time per step added: the loop runs physics and agent one after the
  other, each waiting for the other's output, on a CPU on the same cores, so it cannot beat that sum. Last, the
  rate of the jitted calls alone as they were timed (no physics, no Python): over the FLOP-bound rate, the most
  of it the loop could reach until the kernels themselves get faster;
- the target evaluation and one whole update, as multiples of that matmul.

Wolpertinger gets its own table on Pendulum-v1 grids of 1e4, 2e5 and 1e6 actions: its k-NN, whole action, update
and environment step, and the k-NN's share of a training step.

    python benchmarks/speed.py                                  # walker-walk and dog-walk, N = 1 and 16
    python benchmarks/speed.py --agents qmle_dmc --env-ids dog-walk --num-envs 1 --output speed.json
    python benchmarks/speed.py --agents wolpertinger --wolpertinger-actions 10000 200000 1000000
"""

import functools
import glob
import json
import math
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import List, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tyro

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import aql_discrete as aql  # noqa: E402
import qmle_dmc as qmle  # noqa: E402
import qtopt_cem as qtopt  # noqa: E402
import wolpertinger as wolp  # noqa: E402

RELEASE_SPS = {"walker-walk": 117.0, "dog-walk": 93.0}  # the authors' release on a 2-core CPU (docs/qmle_release)
MATMUL_SHAPE = (25_856, 256, 256)  # the target evaluation's largest matmul: 256 states x 101 candidates, 256 wide


@dataclass
class Args:
    env_ids: List[str] = field(default_factory=lambda: ["walker-walk", "dog-walk"])
    """tasks to measure"""
    agents: List[str] = field(default_factory=lambda: ["qmle_dmc", "qtopt_cem", "aql_discrete", "wolpertinger"])
    """agent scripts to measure (qmle_dmc, qtopt_cem, aql_discrete on --env-ids; wolpertinger on Pendulum-v1 grids)"""
    num_envs: List[int] = field(default_factory=lambda: [1, 16])
    """numbers of environments stepped together (--num-envs of the scripts) to measure each agent and task at"""
    wolpertinger_actions: List[int] = field(default_factory=lambda: [10_000, 200_000, 1_000_000])
    """grid sizes of Pendulum-v1 at which Wolpertinger's k-NN share of a training step is measured"""
    timesteps: int = 4000
    """environment steps of each timed training loop (the release's walker figure used 4000); at least 2500, so that
    the steady rate is read over two log lines past the first update's compilation"""
    repeats: int = 30
    """timed repetitions of each kernel (the median is reported)"""
    output: Optional[str] = None
    """also write the results as JSON here"""


def check_args(args: Args) -> None:
    for name in ("agents",):
        for agent in getattr(args, name):
            if agent not in (*AGENTS, "wolpertinger"):
                fail(f"--agents: unknown agent {agent!r}; choose from {', '.join(AGENTS)}, wolpertinger")
    for name, low in dict(timesteps=2500, repeats=1).items():
        if getattr(args, name) < low:
            fail(f"--{name} must be >= {low}, got {getattr(args, name)}")
    for name in ("num_envs", "wolpertinger_actions"):
        for value in getattr(args, name):
            if value < 1:
                fail(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    for env_id in args.env_ids:
        qmle.make_env(env_id, 0).close()  # an unknown id fails here, before anything is timed


def fail(message: str) -> None:
    raise SystemExit(f"error: {message}")


def call_ms(fn, *args, repeats: int) -> list:
    """Milliseconds of each of `repeats` calls, after one call that compiles and warms up."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(1e3 * (time.perf_counter() - start))
    return times


def median_ms(fn, *args, repeats: int) -> float:
    return float(np.median(call_ms(fn, *args, repeats=repeats)))


def fastest_ms(fn, *args, repeats: int) -> float:
    return min(call_ms(fn, *args, repeats=repeats))


def prefilled_buffer(agent, transitions, capacity: int):
    """A full-size buffer holding ten copies of `transitions`, for timing updates against a realistic tree."""
    buffer = agent.buffer_init(jax.tree.map(lambda x: x[0], transitions), capacity)
    for _ in range(10):
        buffer = agent.buffer_add(buffer, transitions)
    return buffer


def training_sps(agent, env_id: str, timesteps: int, num_envs: int = 1) -> tuple:
    """Run the agent's real training loop; return (cumulative SPS, SPS after the first update's compilation)."""
    with tempfile.TemporaryDirectory() as tmp:
        cwd = os.getcwd()
        os.chdir(tmp)
        try:
            agent.main(
                agent.Args(
                    env_id=env_id,
                    total_timesteps=timesteps,
                    num_envs=num_envs,
                    eval_frequency=0,
                    log_frequency=500,
                    exp_name="speed",
                )
            )
            (path,) = glob.glob("runs/*/metrics.csv")
            rows = [r.split(",") for r in open(path).read().splitlines()]
        finally:
            os.chdir(cwd)
    column = rows[0].index("charts/SPS")
    logged = [(int(r[0]), float(r[column])) for r in rows[1:] if r[column]]
    # Each log line's SPS is the rate since the previous line (the first: since the loop started, the greedy
    # action's compilation in it), so the seconds each interval took are its steps over its rate.
    steps, seconds, previous = [], [], 0
    for step, sps in logged:
        steps.append(step)
        seconds.append((step - previous) / sps)
        previous = step
    elapsed = np.cumsum(seconds)
    first = next(i for i, s in enumerate(steps) if s > agent.Args.learning_starts + 500)  # past the update's compile
    return steps[-1] / elapsed[-1], (steps[-1] - steps[first]) / (elapsed[-1] - elapsed[first])


def physics_ms(env_id: str, num_envs: int, vector_steps: int = 200) -> float:
    """Milliseconds per vector step of N environments stepped with random actions: the physics, the workers'
    messages and the autoreset, with no agent at all."""
    envs = qmle.make_envs(env_id, 0, num_envs)
    envs.reset(seed=0)
    envs.action_space.seed(0)
    actions = [envs.action_space.sample() for _ in range(vector_steps)]
    envs.step(actions[0])  # workers warm
    start = time.perf_counter()
    for action in actions:
        envs.step(action)
    elapsed = time.perf_counter() - start
    envs.close()
    return 1e3 * elapsed / vector_steps


# Multiply-adds of one Q evaluation, counted from the shared architecture (XLA's cost analysis counts a loop
# body once, so it misses the chunking loop): per candidate the action stream, the action half of the joint
# input layer, the joint output layer and the head; per state the observation stream and the observation
# half of the joint input layer.
def q_macs(obs_dim: int, action_dim: int, states: int, candidates: int) -> float:
    per_candidate = action_dim * 128 + 128 * 256 + 256 * 256 + 256
    return states * candidates * per_candidate + states * (obs_dim * 128 + 2 * 128 * 128 + 128 * 256)


def training_macs(obs_dim: int, action_dim: int, batch: int) -> float:
    """The Q network's forward and backward pass on the replayed (s, a): about three forward passes."""
    return 3 * q_macs(obs_dim, action_dim, batch, 1)


def qmle_parts(env_id, obs_dim, action_dim, batch, keys):
    """What qmle_dmc.py times: its target arg-max, its greedy action, its update's arguments, its FLOPs."""
    d = qmle.Args(env_id=env_id)
    model = qmle.QMLENetwork(action_dim, d.num_bins)
    params = jax.jit(model.init)(keys[0], jnp.zeros((1, obs_dim)), jnp.zeros((1, 1, action_dim)))
    rhos = (d.rho_uniform, d.rho_delta, d.rho_categorical, d.grid_fraction)
    target_budget, greedy_budget = qmle.Budget.split(d.m_target, *rhos), qmle.Budget.split(d.m_greedy, *rhos)
    cfg = qmle.UpdateConfig(target_budget, 1, *(getattr(d, k) for k in qmle.UpdateConfig._fields[2:]))
    target = jax.jit(lambda p, o, c, k: qmle.target_argmax(model, p, o, c, k, cfg))
    state = qmle.QMLEState.create(apply_fn=model.apply, params=params, target_params=params, tx=optax.adam(1e-4))
    predictors = lambda states: states * (2 * 128 * 128 + 128 * action_dim * (1 + d.num_bins))  # noqa: E731
    target_macs = q_macs(obs_dim, action_dim, d.batch_size, sum(target_budget) + 1) + predictors(d.batch_size)
    return dict(
        target=lambda k: target(params, batch["next_obs"], batch["argmax"], k),
        act=lambda obs, k: qmle.act(
            model, params, obs, k, jnp.zeros(len(qmle.SOURCES)), d.epsilon, greedy_budget, d.delta_noise_std
        )[0],
        state=state,
        transitions=batch,
        update=lambda updates: functools.partial(qmle.update, model, cfg=cfg._replace(updates=updates)),
        target_gflop=2 * target_macs / 1e9,
        act_gflop=2 * (q_macs(obs_dim, action_dim, 1, d.m_greedy) + predictors(1)) / 1e9,
        update_gflop=2
        * (target_macs + training_macs(obs_dim, action_dim, d.batch_size) + 3 * predictors(d.batch_size))
        / 1e9,
    )


def qtopt_parts(env_id, obs_dim, action_dim, batch, keys):
    """What qtopt_cem.py times: its clipped double-Q target with CEM, its CEM action, its update, its FLOPs."""
    d = qtopt.Args(env_id=env_id)
    model = qtopt.QNetwork(action_dim)
    params = jax.jit(model.init)(keys[0], jnp.zeros((1, obs_dim)), jnp.zeros((1, 1, action_dim)))
    cem = qtopt.CEM(d.cem_samples, d.cem_elites, d.cem_iterations, d.cem_min_std)
    target = jax.jit(functools.partial(qtopt.clipped_double_q, model, cem=cem))
    cfg = qtopt.UpdateConfig(cem, 1, *(getattr(d, n) for n in qtopt.UpdateConfig._fields[2:]))
    state = qtopt.QTOptState.create(
        apply_fn=model.apply, params=params, target_params=params, lagged_params=params, tx=optax.adam(1e-4)
    )
    searched = d.cem_samples * d.cem_iterations
    target_macs = q_macs(obs_dim, action_dim, d.batch_size, searched) + q_macs(obs_dim, action_dim, d.batch_size, 1)
    return dict(
        target=lambda k: target(params, params, batch["next_obs"], k),
        act=lambda obs, k: qtopt.act(model, params, obs, k, jnp.zeros(2), d.epsilon, cem)[0],
        state=state,
        transitions={k: v for k, v in batch.items() if k != "argmax"},
        update=lambda updates: functools.partial(qtopt.update, model, cfg=cfg._replace(updates=updates)),
        target_gflop=2 * target_macs / 1e9,  # CEM's samples, then the lagged Q at its arg-max
        act_gflop=2 * q_macs(obs_dim, action_dim, 1, searched) / 1e9,
        update_gflop=2 * (target_macs + training_macs(obs_dim, action_dim, d.batch_size)) / 1e9,
    )


def aql_parts(env_id, obs_dim, action_dim, batch, keys):
    """What aql_discrete.py times: its search over N proposal + M uniform samples with the target networks, its
    greedy action, its update (without the amortisation measurement, which runs once per log line), its FLOPs."""
    d = aql.Args(env_id=env_id)
    model = aql.AQLNetwork(action_dim, d.num_bins, d.proposal_hidden)
    bins = aql.uniform_actions(keys[1], (d.batch_size, action_dim), d.num_bins)
    params = jax.jit(model.init)(keys[0], jnp.zeros((1, obs_dim)), bins[:1, None])
    search = dict(n_proposal=d.n_proposal, m_uniform=d.m_uniform)
    target = jax.jit(functools.partial(aql.search_argmax, model, **search))
    cfg = aql.UpdateConfig(1, 0, *(getattr(d, n) for n in aql.UpdateConfig._fields[2:]))
    state = aql.AQLState.create(apply_fn=model.apply, params=params, target_params=params, tx=optax.adam(1e-4))
    candidates = d.n_proposal + d.m_uniform
    # the proposal's MLP on every sub-action step of every proposal sample (embedding, one-hots, hidden, logits)
    proposal = lambda states: states * (
        128 * d.proposal_hidden  # noqa: E731
        + d.n_proposal * action_dim * d.proposal_hidden * d.num_bins
    )
    target_macs = q_macs(obs_dim, action_dim, d.batch_size, candidates) + proposal(d.batch_size)
    return dict(
        target=lambda k: target(params, batch["next_obs"], k),
        act=lambda obs, k: aql.act(model, params, obs, k, jnp.zeros(2), d.epsilon, **search)[0],
        state=state,
        transitions=dict(
            obs=batch["obs"],
            action=bins,
            reward=batch["reward"],
            next_obs=batch["next_obs"],
            terminated=batch["terminated"],
        ),
        update=lambda updates: functools.partial(aql.update, model, cfg=cfg._replace(updates=updates)),
        target_gflop=2 * target_macs / 1e9,
        act_gflop=2 * (q_macs(obs_dim, action_dim, 1, candidates) + proposal(1)) / 1e9,
        update_gflop=2
        * (target_macs + training_macs(obs_dim, action_dim, d.batch_size) + 3 * d.batch_size * 128 * d.proposal_hidden)
        / 1e9,
    )  # + teacher-forced log-probs, small


AGENTS = {"qmle_dmc": (qmle, qmle_parts), "qtopt_cem": (qtopt, qtopt_parts), "aql_discrete": (aql, aql_parts)}


def matmul_ms(repeats: int) -> float:
    """The reference matmul's fastest of 3 x repeats calls: the rate this machine can reach. Other work on a shared
    machine only ever slows a call; a median taken during a slow spell read 15 ms where the matmul takes 9, and so
    made every loop look closer to its bound. Three times the calls give more chances of an undisturbed one; the
    kernels it is compared with keep their medians, so every fraction of it errs low, not high."""
    rows, inner, cols = MATMUL_SHAPE
    x = jax.random.normal(jax.random.PRNGKey(0), (rows, inner))
    w = jax.random.normal(jax.random.PRNGKey(1), (inner, cols))
    return fastest_ms(jax.jit(lambda x, w: x @ w), x, w, repeats=3 * repeats)


def measure(agent_name: str, env_id: str, num_envs: int, args: Args, matmul: float) -> dict:
    """One agent on one task with N environments: its loop's rate, its parts, and the rates that bound it."""
    agent, parts_of = AGENTS[agent_name]
    env = agent.make_env(env_id, 0)
    obs_dim, action_dim = env.observation_space.shape[0], env.action_space.shape[0]
    env.close()
    keys = jax.random.split(jax.random.PRNGKey(1), 4)
    size = agent.Args.batch_size
    actions = jax.random.uniform(keys[1], (size, action_dim), minval=-1, maxval=1)
    observations = jax.random.normal(keys[2], (size, obs_dim))
    batch = dict(
        obs=observations,
        action=actions,
        reward=jnp.ones(size),
        next_obs=observations,
        terminated=jnp.zeros(size),
        argmax=actions,
    )
    parts = parts_of(env_id, obs_dim, action_dim, batch, keys)
    target_ms = median_ms(parts["target"], keys[3], repeats=args.repeats)
    obs = np.asarray(observations[:num_envs])  # a host array, as the environments give it
    act_ms = median_ms(lambda k: np.asarray(parts["act"](obs, k)), keys[3], repeats=10 * args.repeats)

    # One update call as the loop makes it with N environments: store lcm(N, tf) transitions, take lcm / tf
    # gradient steps, against a full-size (1e6) buffer holding a few thousand random transitions.
    train_frequency = agent.Args.train_frequency
    rows = math.lcm(num_envs, train_frequency)
    transitions = parts["transitions"]
    buffer = prefilled_buffer(agent, transitions, agent.Args.buffer_size)
    new = jax.tree.map(lambda x: jnp.resize(x, (rows, *x.shape[1:])), transitions)
    train = parts["update"](rows // train_frequency)  # the agent's update with its settings, as main() binds them
    state, buffer, _ = train(parts["state"], buffer, new, keys[0])
    jax.block_until_ready(buffer)
    times = []
    for i in range(args.repeats):
        start = time.perf_counter()
        state, buffer, _ = train(state, buffer, new, jax.random.PRNGKey(i))
        jax.block_until_ready(buffer)
        times.append(time.perf_counter() - start)
    update_ms = 1e3 * float(np.median(times))
    del buffer, state

    physics = physics_ms(env_id, num_envs)
    cumulative_sps, steady_sps = training_sps(agent, env_id, args.timesteps, num_envs)
    release = RELEASE_SPS.get(env_id) if num_envs == 1 else None
    step = breakdown(num_envs, train_frequency, steady_sps, physics, act_ms, update_ms)
    bounds = flop_bound(parts, train_frequency, steady_sps, matmul, physics / num_envs)
    return dict(
        agent=agent_name,
        env_id=env_id,
        num_envs=num_envs,
        action_dim=action_dim,
        obs_dim=obs_dim,
        sps_cumulative=cumulative_sps,
        sps_after_compile=steady_sps,
        physics_sps=1e3 * num_envs / physics,
        release_sps=release,
        speedup_after_compile=steady_sps / release if release else None,
        **step,
        **bounds,
        **kernels_bound(step, bounds["flop_bound_sps"]),
        matmul_ms=matmul,
        target_eval_ms=target_ms,
        target_eval_over_matmul=target_ms / matmul,
        update_ms=update_ms,
        update_over_matmul=update_ms / matmul,
        greedy_action_ms=act_ms,
        target_eval_gflop=parts["target_gflop"],
        target_eval_fraction_of_matmul_rate=(parts["target_gflop"] / target_ms) / matmul_gflop_per_ms(matmul),
    )


def breakdown(
    num_envs: int, train_frequency: int, steady_sps: float, physics: float, act_ms: float, update_ms: float
) -> dict:
    """Milliseconds per environment step: physics, greedy action and update, each as measured alone and shared
    by the N environments of a vector step, and the rest of the loop's own time per step (Python, logging,
    copies to the host), which is what the steady rate leaves over after the three."""
    step = dict(
        physics=physics / num_envs,
        greedy_action=act_ms / num_envs,
        update=update_ms / math.lcm(num_envs, train_frequency),
    )
    return dict(
        step_ms=1e3 / steady_sps,
        **{f"{k}_ms_per_step": v for k, v in step.items()},
        rest_ms_per_step=1e3 / steady_sps - sum(step.values()),
    )


def matmul_gflop_per_ms(matmul: float) -> float:
    rows, inner, cols = MATMUL_SHAPE
    return 2 * rows * inner * cols / 1e9 / matmul


def flop_bound(parts: dict, train_frequency: int, steady_sps: float, matmul: float, physics_per_step: float) -> dict:
    """One environment step's floating-point work (the greedy action for its state, 1 / train_frequency of an
    update) at the matmul's rate: the steps per second this device allows the loop's arithmetic. The loop steps
    the physics and then the agent, each waiting for the other's output (a vector env's step blocks too), so the
    second bound adds the physics' measured milliseconds per step: what this loop would reach on a CPU, where
    both share the cores, if its arithmetic ran at the matmul's rate."""
    step_gflop = parts["act_gflop"] + parts["update_gflop"] / train_frequency
    bound = 1e3 * matmul_gflop_per_ms(matmul) / step_gflop
    with_physics = 1e3 / (1e3 / bound + physics_per_step)
    return dict(
        step_gflop=step_gflop,
        flop_bound_sps=bound,
        fraction_of_flop_bound=steady_sps / bound,
        flop_and_physics_bound_sps=with_physics,
        fraction_of_flop_and_physics_bound=steady_sps / with_physics,
    )


def measure_wolpertinger(num_actions: int, args: Args, matmul: float) -> dict:
    """Wolpertinger at its defaults (Pendulum-v1, k = 10% of the actions, one update per step): the k-NN alone
    (one query against the whole table), one whole action (actor, k-NN, critic over the k neighbours), one
    update (the mean of the critic-only and the critic + actor variants, as --policy-frequency 2 alternates
    them) and one environment step; their sum is a training step, and the k-NN's share of it is reported."""
    d = wolp.Args(max_actions=num_actions)
    env = wolp.make_env(d.env_id, 0)
    table = jnp.asarray(wolp.action_table(env.action_space, num_actions))
    k = wolp.neighbour_count(d, table.shape[0])
    nets = wolp.Networks(wolp.Actor(table.shape[1]), wolp.Critic(), k)
    obs, _ = env.reset(seed=0)
    keys = jax.random.split(jax.random.PRNGKey(1), 4)
    params = dict(
        actor=jax.jit(nets.actor.init)(keys[0], obs[None]),
        critic=jax.jit(nets.critic.init)(keys[1], obs[None], table[None, :1]),
    )
    proto = jax.random.uniform(keys[2], (1, table.shape[1]), minval=-1, maxval=1)
    knn_ms = median_ms(lambda q: wolp.nearest_actions(table, q, k), proto, repeats=args.repeats)
    act = lambda key: wolp.act(nets, table, params, obs[None], key, jnp.zeros(2, jnp.int32), d.exploration_noise, 0.0)
    act_ms = median_ms(lambda key: act(key)[0], keys[3], repeats=args.repeats)

    size = d.batch_size
    observations = jax.random.normal(keys[2], (size, obs.shape[0]))
    transitions = dict(
        obs=observations, action=table[:size], reward=jnp.ones(size), next_obs=observations, terminated=jnp.zeros(size)
    )
    buffer = prefilled_buffer(wolp, transitions, d.buffer_size)
    states = {
        name: wolp.DDPGState.create(apply_fn=None, params=p, target_params=p, tx=optax.adam(d.learning_rate))
        for name, p in params.items()
    }
    new = jax.tree.map(lambda x: x[: d.train_frequency], transitions)
    update_ms = []
    cfg = wolp.UpdateConfig(1, *(getattr(d, n) for n in wolp.UpdateConfig._fields[1:]))
    for phase in range(2):  # with --policy-frequency 2: a critic-only update, then one with the actor
        train = functools.partial(wolp.update, nets, cfg=cfg, phase=1 - phase)
        times = []
        for i in range(args.repeats + 1):  # the first call compiles
            start = time.perf_counter()
            states, buffer, _ = train(states, buffer, new, table, jax.random.PRNGKey(i))
            jax.block_until_ready(buffer)
            times.append(time.perf_counter() - start)
        update_ms.append(1e3 * float(np.median(times[1:])))
    del buffer
    env.reset(seed=0)
    start = time.perf_counter()
    for _ in range(200):
        env.step(env.action_space.sample())
    env_ms = 1e3 * (time.perf_counter() - start) / 200
    step_ms = act_ms + env_ms + float(np.mean(update_ms)) / d.train_frequency
    return dict(
        agent="wolpertinger",
        env_id=d.env_id,
        num_actions=int(table.shape[0]),
        k=k,
        matmul_ms=matmul,
        knn_ms=knn_ms,
        act_ms=act_ms,
        act_over_matmul=act_ms / matmul,
        update_ms=float(np.mean(update_ms)),
        env_step_ms=env_ms,
        step_ms=step_ms,
        knn_share_of_step=knn_ms / step_ms,
        steps_per_second=1e3 / step_ms,
    )


def kernels_bound(step: dict, flop_bound_sps: float) -> dict:
    """The rate of the jitted calls alone, as timed: the greedy action's and the update's milliseconds per step
    back to back, with no physics and no Python. Over the FLOP-bound rate, it is the most of that rate the loop
    could reach with its kernels as fast as they are now; only faster kernels can raise it."""
    sps = 1e3 / (step["greedy_action_ms_per_step"] + step["update_ms_per_step"])
    return dict(kernels_bound_sps=sps, kernels_cap_on_fraction=sps / flop_bound_sps)


def device_name() -> str:
    device = jax.devices()[0]
    if device.platform == "cpu":  # the cores this process may use (taskset; not a cgroup quota), as XLA's threads
        usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        of_machine = f" of {os.cpu_count()}" if usable != os.cpu_count() else ""
        return f"CPU: {platform.processor() or platform.machine()}, {usable}{of_machine} cores"
    return f"{device.platform.upper()}: {device.device_kind}"


def save(args: Args, results: list) -> None:
    if args.output:
        with open(args.output, "w") as f:
            json.dump(dict(device=device_name(), jax=jax.__version__, results=results), f, indent=1)


def main(args: Args) -> None:
    check_args(args)
    results, wolpertinger_results = [], []
    print(f"{device_name()}, jax {jax.__version__}", flush=True)
    for name in args.agents:
        if name == "wolpertinger":
            for num_actions in args.wolpertinger_actions:
                wolpertinger_results.append(measure_wolpertinger(num_actions, args, matmul_ms(args.repeats)))
                save(args, results + wolpertinger_results)
            continue
        for env_id in args.env_ids:
            for num_envs in args.num_envs:
                print(f"measuring {name} on {env_id} with {num_envs} env(s) ...", flush=True)
                # the matmul re-measured beside each configuration, so that each row's ratios share one moment
                results.append(measure(name, env_id, num_envs, args, matmul_ms(args.repeats)))
                save(args, results + wolpertinger_results)  # after each, so that a run cut short keeps what it has
    print(f"\n{device_name()}, jax {jax.__version__}")
    if results:
        print(
            "\n| agent | task | N | steps/s after compile | physics alone | FLOP-bound | steady / FLOP-bound "
            "| FLOP + physics bound (steady / it) | kernels alone (over FLOP-bound) "
            "| ms per step: physics, greedy action, update, rest | steps/s cumulative (x release) |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for r in results:
            release = f" ({r['sps_cumulative'] / r['release_sps']:.2f}x)" if r["release_sps"] else ""
            print(
                f"| {r['agent']} | {r['env_id']} | {r['num_envs']} | {r['sps_after_compile']:.0f} "
                f"| {r['physics_sps']:.0f} | {r['flop_bound_sps']:.0f} | {r['fraction_of_flop_bound']:.2f} "
                f"| {r['flop_and_physics_bound_sps']:.0f} ({r['fraction_of_flop_and_physics_bound']:.2f}) "
                f"| {r['kernels_bound_sps']:.0f} ({r['kernels_cap_on_fraction']:.2f}) "
                f"| {r['physics_ms_per_step']:.2f}, {r['greedy_action_ms_per_step']:.2f}, "
                f"{r['update_ms_per_step']:.2f}, {r['rest_ms_per_step']:.2f} | {r['sps_cumulative']:.0f}{release} |"
            )
        print(
            "\n| agent | task | N | matmul ms | target eval ms (x matmul) | its FLOP rate / matmul's "
            "| update call ms (x matmul) | greedy action ms |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for r in results:
            print(
                f"| {r['agent']} | {r['env_id']} | {r['num_envs']} | {r['matmul_ms']:.1f} "
                f"| {r['target_eval_ms']:.1f} ({r['target_eval_over_matmul']:.2f}x) "
                f"| {r['target_eval_fraction_of_matmul_rate']:.2f} "
                f"| {r['update_ms']:.1f} ({r['update_over_matmul']:.2f}x) | {r['greedy_action_ms']:.2f} |"
            )
    if wolpertinger_results:
        print(
            "\n| agent | task | actions | k | matmul ms | k-NN ms | whole action ms (x matmul) | update ms "
            "| env step ms | training step ms | k-NN share of a step | steps/s |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in wolpertinger_results:
            print(
                f"| wolpertinger | {r['env_id']} | {r['num_actions']:,} | {r['k']:,} | {r['matmul_ms']:.1f} "
                f"| {r['knn_ms']:.2f} | {r['act_ms']:.2f} ({r['act_over_matmul']:.2f}x) | {r['update_ms']:.2f} "
                f"| {r['env_step_ms']:.3f} | {r['step_ms']:.2f} | {r['knn_share_of_step']:.0%} "
                f"| {r['steps_per_second']:.0f} |"
            )


if __name__ == "__main__":
    main(tyro.cli(Args))
