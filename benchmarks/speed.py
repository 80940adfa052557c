"""Speed of the agents at their defaults, as ratios to this machine's matmul.

In one process: the time of one float32 matmul of the update's largest shape (25,856 x 256 x 256), of the
update's target evaluation (QMLE: batch 256 x 101 candidates through the target Q; QT-Opt: CEM, 256 x 64
samples x 2 iterations, and the lagged Q at its arg-max; AQL: 256 x (100 proposal + 400 uniform) candidates),
of one whole update call, of one greedy action, and the training loop's steps per second, updates included.
SPS is reported two ways: cumulative from the start of the loop with compilation and the 1000 warm-up steps
in it (how the authors' release prints it), and after compilation (the steady rate). Wolpertinger gets its
own table on Pendulum-v1 grids of 1e4, 2e5 and 1e6 actions: its k-NN, whole action, update and environment
step, and the k-NN's share of a training step.

    python benchmarks/speed.py                      # walker-walk and dog-walk, prints markdown tables
    python benchmarks/speed.py --agents qmle_dmc --env-ids dog-walk --output speed.json
    python benchmarks/speed.py --agents wolpertinger --wolpertinger-actions 10000 200000 1000000
"""

import functools
import glob
import json
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

RELEASE_SPS = {"walker-walk": 117.0, "dog-walk": 93.0}  # ../shared/peers/qmle-release/README.md, 2-core CPU


@dataclass
class Args:
    env_ids: List[str] = field(default_factory=lambda: ["walker-walk", "dog-walk"])
    """tasks to measure"""
    agents: List[str] = field(default_factory=lambda: ["qmle_dmc", "qtopt_cem", "aql_discrete", "wolpertinger"])
    """agent scripts to measure (qmle_dmc, qtopt_cem, aql_discrete on --env-ids; wolpertinger on Pendulum-v1 grids)"""
    wolpertinger_actions: List[int] = field(default_factory=lambda: [10_000, 200_000, 1_000_000])
    """grid sizes of Pendulum-v1 at which Wolpertinger's k-NN share of a training step is measured"""
    timesteps: int = 4000
    """environment steps of the timed training loop (the release's walker figure used 4000)"""
    repeats: int = 30
    """timed repetitions of each kernel (the median is reported)"""
    output: Optional[str] = None
    """also write the results as JSON here"""


def median_ms(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def prefilled_buffer(agent, transitions, capacity: int):
    """A full-size buffer holding ten copies of `transitions`, for timing updates against a realistic tree."""
    buffer = agent.buffer_init(jax.tree.map(lambda x: x[0], transitions), capacity)
    for _ in range(10):
        buffer = agent.buffer_add(buffer, transitions)
    return buffer


def training_sps(agent, env_id: str, timesteps: int) -> tuple:
    """Run the agent's real training loop; return (cumulative SPS, SPS after the first update's compilation)."""
    with tempfile.TemporaryDirectory() as tmp:
        cwd = os.getcwd()
        os.chdir(tmp)
        try:
            agent.main(agent.Args(env_id=env_id, total_timesteps=timesteps, eval_frequency=0, log_frequency=500,
                                  exp_name="speed"))
            (path,) = glob.glob("runs/*/metrics.csv")
            rows = [r.split(",") for r in open(path).read().splitlines()]
        finally:
            os.chdir(cwd)
    column = rows[0].index("charts/SPS")
    sps = {int(r[0]): float(r[column]) for r in rows[1:] if r[column]}
    steps = sorted(sps)
    elapsed = {s: s / sps[s] for s in steps}  # cumulative SPS = step / seconds since the loop started
    first = next(s for s in steps if s > agent.Args.learning_starts + 500)  # past the update's compilation
    return sps[steps[-1]], (steps[-1] - first) / (elapsed[steps[-1]] - elapsed[first])


# Multiply-adds of one Q evaluation, counted from the shared architecture (XLA's cost analysis counts a loop
# body once, so it misses the chunking loop): per candidate the action stream, the action half of the joint
# input layer, the joint output layer and the head; per state the observation stream and the observation
# half of the joint input layer.
def q_macs(obs_dim: int, action_dim: int, states: int, candidates: int) -> float:
    per_candidate = action_dim * 128 + 128 * 256 + 256 * 256 + 256
    return states * candidates * per_candidate + states * (obs_dim * 128 + 2 * 128 * 128 + 128 * 256)


def qmle_parts(env_id, obs_dim, action_dim, batch, keys):
    """What qmle_dmc.py times: its target arg-max, its greedy action, its update's arguments, its FLOPs."""
    d = qmle.Args(env_id=env_id)
    model = qmle.QMLENetwork(action_dim, d.num_bins)
    params = jax.jit(model.init)(keys[0], jnp.zeros((1, obs_dim)), jnp.zeros((1, 1, action_dim)))
    split = functools.partial(qmle.Budget.split, rho_uniform=d.rho_uniform, rho_delta=d.rho_delta,
                              rho_categorical=d.rho_categorical)
    target_budget, greedy_budget = split(d.m_target), split(d.m_greedy)
    target = jax.jit(functools.partial(qmle.target_argmax, model, budget=target_budget, noise_std=d.delta_noise_std))
    state = qmle.QMLEState.create(apply_fn=model.apply, params=params, target_params=params, tx=optax.adam(1e-4))
    predictors = d.batch_size * 2 * (128 * 128) + d.batch_size * 128 * action_dim * (1 + d.num_bins)
    return dict(
        target=lambda k: target(params, batch["next_obs"], batch["argmax"], k),
        act=lambda k: qmle.select_action(model, params, np.asarray(batch["obs"][0]), k, 0.0, greedy_budget,
                                         d.delta_noise_std),
        state=state, transitions=batch,
        update=functools.partial(qmle.update, model, gamma=d.gamma, batch_size=d.batch_size, budget=target_budget,
                                 noise_std=d.delta_noise_std, prioritized=True, alpha=d.priority_exponent,
                                 beta=d.importance_exponent, priority_epsilon=d.priority_epsilon),
        target_gflop=2 * (q_macs(obs_dim, action_dim, d.batch_size, sum(target_budget) + 1) + predictors) / 1e9)


def qtopt_parts(env_id, obs_dim, action_dim, batch, keys):
    """What qtopt_cem.py times: its clipped double-Q target with CEM, its CEM action, its update, its FLOPs."""
    d = qtopt.Args(env_id=env_id)
    model = qtopt.QNetwork(action_dim)
    params = jax.jit(model.init)(keys[0], jnp.zeros((1, obs_dim)), jnp.zeros((1, 1, action_dim)))
    cem = qtopt.CEM(d.cem_samples, d.cem_elites, d.cem_iterations, d.cem_min_std)
    target = jax.jit(functools.partial(qtopt.clipped_double_q, model, cem=cem))
    state = qtopt.QTOptState.create(apply_fn=model.apply, params=params, target_params=params, lagged_params=params,
                                    tx=optax.adam(1e-4))
    searched = q_macs(obs_dim, action_dim, d.batch_size, d.cem_samples * d.cem_iterations)
    return dict(
        target=lambda k: target(params, params, batch["next_obs"], k),
        act=lambda k: qtopt.select_action(model, params, np.asarray(batch["obs"][0]), k, 0.0, cem),
        state=state, transitions={k: v for k, v in batch.items() if k != "argmax"},
        update=functools.partial(qtopt.update, model, gamma=d.gamma, batch_size=d.batch_size, cem=cem,
                                 prioritized=True, alpha=d.priority_exponent, beta=d.importance_exponent,
                                 priority_epsilon=d.priority_epsilon),
        target_gflop=2 * (searched + q_macs(obs_dim, action_dim, d.batch_size, 1)) / 1e9)  # + the lagged Q at a*


def aql_parts(env_id, obs_dim, action_dim, batch, keys):
    """What aql_discrete.py times: its search over N proposal + M uniform samples with the target networks, its
    greedy action, its update (without the amortisation measurement, which runs once per log line), its FLOPs."""
    d = aql.Args(env_id=env_id)
    model = aql.AQLNetwork(action_dim, d.num_bins, d.proposal_hidden)
    bins = aql.uniform_actions(keys[1], (d.batch_size, action_dim), d.num_bins)
    params = jax.jit(model.init)(keys[0], jnp.zeros((1, obs_dim)), bins[:1, None])
    search = dict(n_proposal=d.n_proposal, m_uniform=d.m_uniform)
    target = jax.jit(functools.partial(aql.search_argmax, model, **search))
    state = aql.AQLState.create(apply_fn=model.apply, params=params, target_params=params, tx=optax.adam(1e-4))
    candidates = d.n_proposal + d.m_uniform
    proposal = d.batch_size * (128 * d.proposal_hidden + d.n_proposal * action_dim * d.proposal_hidden * d.num_bins)
    return dict(
        target=lambda k: target(params, batch["next_obs"], k),
        act=lambda k: aql.select_action(model, params, np.asarray(batch["obs"][0]), k, 0.0, **search),
        state=state, transitions=dict(obs=batch["obs"], action=bins, reward=batch["reward"],
                                      next_obs=batch["next_obs"], terminated=batch["terminated"]),
        update=functools.partial(aql.update, model, gamma=d.gamma, batch_size=d.batch_size,
                                 entropy_coef=d.entropy_coef, prioritized=True, alpha=d.priority_exponent,
                                 beta=d.importance_exponent, priority_epsilon=d.priority_epsilon, **search),
        target_gflop=2 * (q_macs(obs_dim, action_dim, d.batch_size, candidates) + proposal) / 1e9)


AGENTS = {"qmle_dmc": (qmle, qmle_parts), "qtopt_cem": (qtopt, qtopt_parts), "aql_discrete": (aql, aql_parts)}


def measure(agent_name: str, env_id: str, args: Args, matmul_ms: float) -> dict:
    agent, parts_of = AGENTS[agent_name]
    env = agent.make_env(env_id, 0)
    obs_dim, action_dim = env.observation_space.shape[0], env.action_space.shape[0]
    keys = jax.random.split(jax.random.PRNGKey(1), 4)
    size = agent.Args.batch_size
    actions = jax.random.uniform(keys[1], (size, action_dim), minval=-1, maxval=1)
    observations = jax.random.normal(keys[2], (size, obs_dim))
    batch = dict(obs=observations, action=actions, reward=jnp.ones(size), next_obs=observations,
                 terminated=jnp.zeros(size), argmax=actions)
    parts = parts_of(env_id, obs_dim, action_dim, batch, keys)
    target_ms = median_ms(parts["target"], keys[3], repeats=args.repeats)
    act_ms = median_ms(parts["act"], keys[3], repeats=10 * args.repeats)

    # One whole update against a full-size (1e6) buffer holding a few thousand random transitions.
    transitions = parts["transitions"]
    buffer = prefilled_buffer(agent, transitions, agent.Args.buffer_size)
    new = jax.tree.map(lambda x: x[: agent.Args.train_frequency], transitions)
    state, buffer, _ = parts["update"](parts["state"], buffer, new, keys[0])
    jax.block_until_ready(buffer)
    times = []
    for i in range(args.repeats):
        start = time.perf_counter()
        state, buffer, _ = parts["update"](state, buffer, new, jax.random.PRNGKey(i))
        jax.block_until_ready(buffer)
        times.append(time.perf_counter() - start)
    update_ms = 1e3 * float(np.median(times))
    del buffer

    cumulative_sps, steady_sps = training_sps(agent, env_id, args.timesteps)
    matmul_gflop = 2 * 25_856 * 256 * 256 / 1e9
    release = RELEASE_SPS.get(env_id)
    return dict(agent=agent_name, env_id=env_id, action_dim=action_dim, obs_dim=obs_dim, matmul_ms=matmul_ms,
                target_eval_ms=target_ms, target_eval_over_matmul=target_ms / matmul_ms, update_ms=update_ms,
                update_over_matmul=update_ms / matmul_ms, target_eval_gflop=parts["target_gflop"],
                target_eval_fraction_of_matmul_rate=(parts["target_gflop"] / target_ms) / (matmul_gflop / matmul_ms),
                greedy_action_ms=act_ms, sps_cumulative=cumulative_sps, sps_after_compile=steady_sps,
                release_sps=release, speedup_cumulative=cumulative_sps / release if release else None,
                speedup_after_compile=steady_sps / release if release else None)


def measure_wolpertinger(num_actions: int, args: Args, matmul_ms: float) -> dict:
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
    params = dict(actor=jax.jit(nets.actor.init)(keys[0], obs[None]),
                  critic=jax.jit(nets.critic.init)(keys[1], obs[None], table[None, :1]))
    proto = jax.random.uniform(keys[2], (1, table.shape[1]), minval=-1, maxval=1)
    knn_ms = median_ms(lambda q: wolp.nearest_actions(table, q, k), proto, repeats=args.repeats)
    act_ms = median_ms(lambda key: wolp.select_action(nets, params, table, obs, key, d.exploration_noise, 0.0),
                       keys[3], repeats=args.repeats)

    size = d.batch_size
    observations = jax.random.normal(keys[2], (size, obs.shape[0]))
    transitions = dict(obs=observations, action=table[:size], reward=jnp.ones(size), next_obs=observations,
                       terminated=jnp.zeros(size))
    buffer = prefilled_buffer(wolp, transitions, d.buffer_size)
    states = [wolp.DDPGState.create(apply_fn=None, params=p, target_params=p, tx=optax.adam(d.learning_rate))
              for p in (params["actor"], params["critic"])]
    new = jax.tree.map(lambda x: x[: d.train_frequency], transitions)
    update_ms = []
    for update_actor in (False, True):
        train = functools.partial(wolp.update, nets, gamma=d.gamma, tau=d.tau, batch_size=size, prioritized=False,
                                  alpha=d.priority_exponent, beta=d.importance_exponent,
                                  priority_epsilon=d.priority_epsilon, update_actor=update_actor)
        times = []
        for i in range(args.repeats + 1):  # the first call compiles
            start = time.perf_counter()
            *states, buffer, _ = train(*states, buffer, new, table, jax.random.PRNGKey(i))
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
    return dict(agent="wolpertinger", env_id=d.env_id, num_actions=int(table.shape[0]), k=k, matmul_ms=matmul_ms,
                knn_ms=knn_ms, act_ms=act_ms, act_over_matmul=act_ms / matmul_ms, update_ms=float(np.mean(update_ms)),
                env_step_ms=env_ms, step_ms=step_ms, knn_share_of_step=knn_ms / step_ms, steps_per_second=1e3 / step_ms)


def main(args: Args) -> None:
    for name in args.agents:
        if name not in (*AGENTS, "wolpertinger"):
            raise SystemExit(f"error: unknown agent {name!r}; choose from {', '.join(AGENTS)}, wolpertinger")
    for env_id in args.env_ids:
        qmle.make_env(env_id, 0)  # unknown ids fail here, before anything is timed
    matmul = jax.jit(lambda x, w: x @ w)
    x, w = jax.random.normal(jax.random.PRNGKey(0), (25_856, 256)), jax.random.normal(jax.random.PRNGKey(1), (256, 256))
    results, wolpertinger_results = [], []
    for name in args.agents:
        if name == "wolpertinger":
            for num_actions in args.wolpertinger_actions:
                matmul_ms = median_ms(matmul, x, w, repeats=args.repeats)
                wolpertinger_results.append(measure_wolpertinger(num_actions, args, matmul_ms))
            continue
        for env_id in args.env_ids:
            matmul_ms = median_ms(matmul, x, w, repeats=args.repeats)  # re-measured beside each task's timings
            results.append(measure(name, env_id, args, matmul_ms))
    info = dict(machine=platform.processor() or platform.machine(), cpus=os.cpu_count(), jax=jax.__version__,
                device=str(jax.devices()[0]))
    print(f"\n{info}")
    print("| agent | task | matmul ms | target eval ms (x matmul) | update ms (x matmul) | target eval FLOP rate / matmul's | "
          "greedy action ms | SPS cumulative (x release) | SPS after compile (x release) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        rel = lambda v: f" ({v:.2f}x)" if v else ""  # noqa: E731
        print(f"| {r['agent']} | {r['env_id']} | {r['matmul_ms']:.1f} | {r['target_eval_ms']:.1f} ({r['target_eval_over_matmul']:.2f}x)"
              f" | {r['update_ms']:.1f} ({r['update_over_matmul']:.2f}x) | {r['target_eval_fraction_of_matmul_rate']:.2f}"
              f" | {r['greedy_action_ms']:.2f} | {r['sps_cumulative']:.0f}{rel(r['speedup_cumulative'])}"
              f" | {r['sps_after_compile']:.0f}{rel(r['speedup_after_compile'])} |")
    if wolpertinger_results:
        print("\n| agent | task | actions | k | matmul ms | k-NN ms | whole action ms (x matmul) | update ms "
              "| env step ms | training step ms | k-NN share of a step | steps/s |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in wolpertinger_results:
            print(f"| wolpertinger | {r['env_id']} | {r['num_actions']:,} | {r['k']:,} | {r['matmul_ms']:.1f} "
                  f"| {r['knn_ms']:.2f} | {r['act_ms']:.2f} ({r['act_over_matmul']:.2f}x) | {r['update_ms']:.2f} "
                  f"| {r['env_step_ms']:.3f} | {r['step_ms']:.2f} | {r['knn_share_of_step']:.0%} "
                  f"| {r['steps_per_second']:.0f} |")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(dict(info, results=results + wolpertinger_results), f, indent=1)


if __name__ == "__main__":
    main(tyro.cli(Args))
