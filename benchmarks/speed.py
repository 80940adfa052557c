"""Speed of qmle_dmc.py at the paper's defaults, as ratios to this machine's float32 matmul.

In one process: the time of one float32 matmul of the update's largest shape (25,856 x 256 x 256), of the
update's target evaluation (batch 256 x 101 candidates through the target Q), of one whole update call, of
one greedy action (1000 candidates), and the training loop's steps per second, updates included. SPS is
reported two ways: cumulative from the start of the loop with compilation and the 1000 warm-up steps in
it (how the authors' release prints it), and after compilation (the steady rate).

    python benchmarks/speed.py                      # walker-walk and dog-walk, prints a markdown table
    python benchmarks/speed.py --env-ids dog-walk --output speed.json
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
import qmle_dmc as qmle  # noqa: E402

RELEASE_SPS = {"walker-walk": 117.0, "dog-walk": 93.0}  # ../shared/peers/qmle-release/README.md, 2-core CPU


@dataclass
class Args:
    env_ids: List[str] = field(default_factory=lambda: ["walker-walk", "dog-walk"])
    """tasks to measure"""
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


def training_sps(env_id: str, timesteps: int) -> tuple:
    """Run the real training loop; return (cumulative SPS, SPS after the first update's compilation)."""
    with tempfile.TemporaryDirectory() as tmp:
        cwd = os.getcwd()
        os.chdir(tmp)
        try:
            qmle.main(qmle.Args(env_id=env_id, total_timesteps=timesteps, eval_frequency=0, log_frequency=500,
                                exp_name="speed"))
            (path,) = glob.glob("runs/*/metrics.csv")
            rows = [r.split(",") for r in open(path).read().splitlines()]
        finally:
            os.chdir(cwd)
    column = rows[0].index("charts/SPS")
    sps = {int(r[0]): float(r[column]) for r in rows[1:] if r[column]}
    steps = sorted(sps)
    elapsed = {s: s / sps[s] for s in steps}  # cumulative SPS = step / seconds since the loop started
    first = next(s for s in steps if s > qmle.Args.learning_starts + 500)  # past the update's compilation
    return sps[steps[-1]], (steps[-1] - first) / (elapsed[steps[-1]] - elapsed[first])


def measure(env_id: str, args: Args, matmul_ms: float) -> dict:
    defaults = qmle.Args(env_id=env_id)
    env = qmle.make_env(env_id, 0)
    obs_dim, action_dim = env.observation_space.shape[0], env.action_space.shape[0]
    model = qmle.QMLENetwork(action_dim, defaults.num_bins)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, obs_dim)), jnp.zeros((1, 1, action_dim)))
    split = functools.partial(qmle.Budget.split, rho_uniform=defaults.rho_uniform, rho_delta=defaults.rho_delta,
                              rho_categorical=defaults.rho_categorical)
    target_budget, greedy_budget = split(defaults.m_target), split(defaults.m_greedy)
    keys = jax.random.split(jax.random.PRNGKey(1), 4)
    next_obs = jax.random.normal(keys[0], (defaults.batch_size, obs_dim))
    prior = jax.random.uniform(keys[1], (defaults.batch_size, action_dim), minval=-1, maxval=1)

    target = jax.jit(functools.partial(qmle.target_argmax, model, budget=target_budget,
                                       noise_std=defaults.delta_noise_std))
    target_ms = median_ms(target, params, next_obs, prior, keys[2], repeats=args.repeats)
    obs = np.asarray(next_obs[0])
    act = functools.partial(qmle.select_action, model, params, obs, epsilon=0.0, budget=greedy_budget,
                            noise_std=defaults.delta_noise_std)
    act_ms = median_ms(lambda k: act(key=k), keys[3], repeats=10 * args.repeats)

    # One whole update against a full-size (1e6) buffer holding a few thousand random transitions.
    state = qmle.QMLEState.create(apply_fn=model.apply, params=params, target_params=params,
                                  tx=optax.adam(defaults.learning_rate))
    chunk = dict(obs=next_obs, action=prior, reward=jnp.ones(defaults.batch_size), next_obs=next_obs,
                 terminated=jnp.zeros(defaults.batch_size), argmax=prior)
    buffer = qmle.buffer_init(jax.tree.map(lambda x: x[0], chunk), defaults.buffer_size)
    for _ in range(10):
        buffer = qmle.buffer_add(buffer, chunk)
    step = functools.partial(qmle.update, model, gamma=defaults.gamma, batch_size=defaults.batch_size,
                             budget=target_budget, noise_std=defaults.delta_noise_std, prioritized=True,
                             alpha=defaults.priority_exponent, beta=defaults.importance_exponent,
                             priority_epsilon=defaults.priority_epsilon)
    new = jax.tree.map(lambda x: x[: defaults.train_frequency], chunk)
    state, buffer, _ = step(state, buffer, new, keys[0])
    jax.block_until_ready(buffer)
    times = []
    for i in range(args.repeats):
        start = time.perf_counter()
        state, buffer, _ = step(state, buffer, new, jax.random.PRNGKey(i))
        jax.block_until_ready(buffer)
        times.append(time.perf_counter() - start)
    update_ms = 1e3 * float(np.median(times))
    del buffer

    cumulative_sps, steady_sps = training_sps(env_id, args.timesteps)
    # Multiply-adds of the target evaluation, counted from the architecture (XLA's cost analysis counts a
    # loop body once, so it misses the chunking loop): per candidate the action stream, the action half of
    # the joint input layer, the joint output layer and the head; per state the observation stream, the
    # observation half of the joint input layer and both predictors.
    candidates = defaults.batch_size * (sum(target_budget) + 1)
    per_candidate = action_dim * 128 + 128 * 256 + 256 * 256 + 256
    per_state = obs_dim * 128 + 2 * 128 * 128 + 128 * 256 + 2 * 128 * 128 + 128 * action_dim * (1 + defaults.num_bins)
    target_gflop = 2 * (candidates * per_candidate + defaults.batch_size * per_state) / 1e9
    matmul_gflop = 2 * 25_856 * 256 * 256 / 1e9
    return dict(env_id=env_id, action_dim=action_dim, obs_dim=obs_dim, matmul_ms=matmul_ms,
                target_eval_ms=target_ms, target_eval_over_matmul=target_ms / matmul_ms, update_ms=update_ms,
                update_over_matmul=update_ms / matmul_ms, target_eval_gflop=target_gflop,
                target_eval_fraction_of_matmul_rate=(target_gflop / target_ms) / (matmul_gflop / matmul_ms),
                greedy_action_ms=act_ms, sps_cumulative=cumulative_sps, sps_after_compile=steady_sps,
                release_sps=RELEASE_SPS.get(env_id), speedup_cumulative=cumulative_sps / RELEASE_SPS[env_id]
                if env_id in RELEASE_SPS else None, speedup_after_compile=steady_sps / RELEASE_SPS[env_id]
                if env_id in RELEASE_SPS else None)


def main(args: Args) -> None:
    for env_id in args.env_ids:
        qmle.make_env(env_id, 0)  # unknown ids fail here, before anything is timed
    matmul = jax.jit(lambda x, w: x @ w)
    x, w = jax.random.normal(jax.random.PRNGKey(0), (25_856, 256)), jax.random.normal(jax.random.PRNGKey(1), (256, 256))
    results = []
    for env_id in args.env_ids:
        matmul_ms = median_ms(matmul, x, w, repeats=args.repeats)  # re-measured beside each task's timings
        results.append(measure(env_id, args, matmul_ms))
    info = dict(machine=platform.processor() or platform.machine(), cpus=os.cpu_count(), jax=jax.__version__,
                device=str(jax.devices()[0]))
    print(f"\n{info}")
    print("| task | matmul ms | target eval ms (x matmul) | update ms (x matmul) | target eval FLOP rate / matmul's | "
          "greedy action ms | SPS cumulative (x release) | SPS after compile (x release) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        rel = lambda v: f" ({v:.2f}x)" if v else ""  # noqa: E731
        print(f"| {r['env_id']} | {r['matmul_ms']:.1f} | {r['target_eval_ms']:.1f} ({r['target_eval_over_matmul']:.2f}x)"
              f" | {r['update_ms']:.1f} ({r['update_over_matmul']:.2f}x) | {r['target_eval_fraction_of_matmul_rate']:.2f}"
              f" | {r['greedy_action_ms']:.2f} | {r['sps_cumulative']:.0f}{rel(r['speedup_cumulative'])}"
              f" | {r['sps_after_compile']:.0f}{rel(r['speedup_after_compile'])} |")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(dict(info, results=results), f, indent=1)


if __name__ == "__main__":
    main(tyro.cli(Args))
