"""Why QMLE: improving a policy by gradients is local; learning the arg-max by maximum likelihood need not be.

Figure 1: under exact gradients a softmax policy on a multi-armed bandit ranks the arms, then picks the best;
a delta and a fixed-variance Gaussian policy on a 1-D bimodal bandit climb the nearest mode and stay there.
Figure 2: on a 2-D bandit (broad sub-optimal mode, narrow optimal one), Q learned from sampled rewards, DPG and
QMLE with local sampling stay in the sub-optimal mode, QMLE with added uniform sampling finds the optimal one,
under each of three explorations around the delta: uniform epsilon-greedy, Gaussian and Ornstein-Uhlenbeck noise.
Paper: Tavakoli et al. 2024, "Learning in complex action spaces without policy gradients" (arXiv 2410.06317),
Sections 3.2 and 5.1, Figures 1 and 2.  Reproduce: python bandit_illustration.py  (writes to runs/bandit_illustration/;
--output-dir docs/figures updates the committed figures)
"""

import json
import math
import os
import signal
import time
from dataclasses import dataclass
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")  # the script only writes PNG files; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import tyro  # noqa: E402


@dataclass
class Args:
    seed: int = 1
    """seed of the first run; seed index i uses seed + i (the same for every learner and strategy)"""
    num_seeds: int = 10
    """seeds per learner and exploration strategy (all 9 x num_seeds runs train at once under jax.vmap)"""
    output_dir: str = "runs/bandit_illustration"
    """folder for bandit_fig1.png, bandit_fig2.png and bandit_results.json (created if missing; docs/figures holds
    the committed ones)"""
    num_steps: int = 2000
    """training steps on the 2-D bandit; each step pulls the arm `pulls_per_step` times, updates Q and the delta"""
    learning_starts: int = 200
    """steps during which only Q learns (the delta stays at its initialisation), so that no learner follows an
    untrained Q"""
    pulls_per_step: int = 16
    """bandit pulls per step, each with its own exploration noise"""
    buffer_size: int = 8192
    """pulls kept for Q's regression (the most recent ones)"""
    batch_size: int = 64
    """pulls per Q update"""
    q_learning_rate: float = 1e-2
    """Adam step size of the Q network"""
    delta_learning_rate: float = 1e-2
    """Adam step size of the delta (DPG's actor and QMLE's arg-max predictor alike)"""
    m_local: int = 32
    """local candidates per QMLE update: Gaussian samples around the delta, std `local_std`"""
    local_std: float = 0.001
    """std of the local candidates (the paper's 0.001: a Monte Carlo stand-in for DPG's action gradient)"""
    m_uniform: int = 256
    """uniform candidates over [-1, 1]^2 per update, used by qmle_global only"""
    epsilon: float = 0.2
    """exploration 'epsilon': probability that a pull is uniform over [-1, 1]^2 instead of the delta"""
    gaussian_std: float = 0.4
    """exploration 'gaussian': std of the independent Gaussian noise added to the delta"""
    ou_theta: float = 0.15
    """exploration 'ou': mean reversion of the Ornstein-Uhlenbeck noise added to the delta"""
    ou_sigma: float = 0.2
    """exploration 'ou': scale of the Ornstein-Uhlenbeck noise's increments (stationary std about 0.38)"""
    init_radius: float = 0.25
    """the delta starts uniformly within this distance of the sub-optimal mode's centre"""
    fig1_steps: int = 400
    """exact-gradient steps shown in Figure 1"""


LEARNERS = ("dpg", "qmle_local", "qmle_global")
STRATEGIES = ("epsilon", "gaussian", "ou")


def check_args(args: Args) -> None:
    """Fail early with one line (SystemExit prints it on stderr, exit status 1), never a traceback."""
    for name, value in vars(args).items():
        if isinstance(value, float) and not math.isfinite(value):
            raise SystemExit(f"error: --{name.replace('_', '-')} must be a finite number, got {value}")
    positive = (
        "num_seeds",
        "num_steps",
        "pulls_per_step",
        "buffer_size",
        "batch_size",
        "m_local",
        "m_uniform",
        "fig1_steps",
    )
    for name in positive:
        if getattr(args, name) < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0 <= args.seed <= 2**31 - args.num_seeds:  # the runs' seeds, --seed + i, go to the device as int32
        raise SystemExit(
            f"error: --seed must be in [0, {2**31 - args.num_seeds}] with --num-seeds {args.num_seeds}, got {args.seed}"
        )
    if args.buffer_size < args.pulls_per_step:  # a step's pulls would overwrite each other
        raise SystemExit(
            f"error: --buffer-size must hold the {args.pulls_per_step} pulls written per step "
            f"(--pulls-per-step), got {args.buffer_size}"
        )
    if not 0 <= args.learning_starts < args.num_steps:
        raise SystemExit(f"error: --learning-starts must be in [0, --num-steps), got {args.learning_starts}")
    if not 0.0 <= args.epsilon <= 1.0:
        raise SystemExit(f"error: --epsilon must be in [0, 1], got {args.epsilon}")
    for name in (
        "q_learning_rate",
        "delta_learning_rate",
        "local_std",
        "gaussian_std",
        "ou_theta",
        "ou_sigma",
        "init_radius",
    ):
        if not getattr(args, name) > 0:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if args.ou_theta >= 2:  # ou - theta * ou overshoots by more than it reverts: the noise grows without bound
        raise SystemExit(f"error: --ou-theta must be < 2, got {args.ou_theta}")
    per_run = 3 * args.buffer_size + 2 * (args.num_steps + 1) + 2 * args.batch_size * (args.m_local + args.m_uniform)
    need, memory = 4 * 9 * args.num_seeds * per_run, os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if need > memory:  # every run's pulls, delta trajectory and candidates, all at once under vmap
        raise SystemExit(
            f"error: --num-seeds {args.num_seeds} (9 runs each, --buffer-size {args.buffer_size}, --num-steps "
            f"{args.num_steps}) needs {need / 2**30:.3g} GiB, more than this machine's {memory / 2**30:.3g} GiB"
        )
    edge = 1.0 - float(jnp.abs(SUB_CENTRE).max())  # the start disc must lie inside the action box (-1, 1)^2
    if args.init_radius >= edge:
        raise SystemExit(
            f"error: --init-radius must be < {edge:g} (the sub-optimal mode's centre is "
            f"{[round(float(c), 2) for c in SUB_CENTRE]} in the box (-1, 1)^2), got {args.init_radius}"
        )
    out = os.path.abspath(args.output_dir)
    if os.path.exists(out) and not os.path.isdir(out):
        raise SystemExit(f"error: --output-dir {args.output_dir} exists and is not a folder")


# ---------------------------------------------------------------------------------------------------------------
# Figure 1: exact policy gradients (the rewards are known, so no sampling is involved)
# ---------------------------------------------------------------------------------------------------------------
ARM_REWARDS = jnp.array([0.3, 0.8, 0.1, 1.0, 0.55, 0.65])  # multi-armed bandit, arm 3 is the arg-max

# 1-D bimodal bandit on [-1, 1]: a broad sub-optimal bump and a narrow optimal one
BUMPS_1D = ((0.6, -0.45, 0.25), (1.0, 0.55, 0.1))  # (height, centre, width)
START_1D = -0.95  # in the sub-optimal basin
GAUSSIAN_POLICY_STD = 0.2


def softmax_policy_gradient(logits, rewards):
    """Exact gradient of J = sum_a pi(a) r(a) for a tabular softmax policy pi = softmax(logits):
    sum_a pi(a) r(a) grad log pi(a) = pi * (r - pi . r)."""
    pi = jax.nn.softmax(logits)
    return pi * (rewards - jnp.dot(pi, rewards))


def reward_1d(a):
    return sum(h * jnp.exp(-((a - c) ** 2) / (2 * w**2)) for h, c, w in BUMPS_1D)


def gaussian_policy_objective(mu, std):
    """E_{a ~ N(mu, std^2)}[r(a)] in closed form: a Gaussian bump convolved with a Gaussian is a wider bump.
    (Actions are not clipped to [-1, 1] here: the 1-D reward is defined on the whole line.)"""
    return sum(
        h * w / jnp.sqrt(w**2 + std**2) * jnp.exp(-((mu - c) ** 2) / (2 * (w**2 + std**2))) for h, c, w in BUMPS_1D
    )


@partial(jax.jit, static_argnames="steps")
def figure1_trajectories(key, steps: int = 400):
    """Gradient ascent on the three exact objectives; returns the softmax probabilities, delta and Gaussian means."""
    logits0 = 0.5 * jax.random.normal(key, ARM_REWARDS.shape)  # a random initialisation, as in the paper

    def step(carry, _):
        logits, mu_delta, mu_gauss = carry
        logits = logits + 0.5 * softmax_policy_gradient(logits, ARM_REWARDS)
        mu_delta = mu_delta + 0.01 * jax.grad(reward_1d)(mu_delta)
        mu_gauss = mu_gauss + 0.01 * jax.grad(gaussian_policy_objective)(mu_gauss, GAUSSIAN_POLICY_STD)
        return (logits, mu_delta, mu_gauss), (jax.nn.softmax(logits), mu_delta, mu_gauss)

    init = (logits0, jnp.float32(START_1D), jnp.float32(START_1D))
    _, (probs, mu_delta, mu_gauss) = jax.lax.scan(step, init, None, length=steps)
    return (
        jnp.concatenate([jax.nn.softmax(logits0)[None], probs]),
        jnp.concatenate([init[1][None], mu_delta]),
        jnp.concatenate([init[2][None], mu_gauss]),
    )


def plot_figure1(probs, mu_delta, mu_gauss, path):
    probs, mu_delta, mu_gauss = np.asarray(probs), np.asarray(mu_delta), np.asarray(mu_gauss)
    fig, ax = plt.subplots(1, 4, figsize=(17, 3.6))
    colours = plt.cm.tab10(np.arange(len(ARM_REWARDS)))
    ax[0].bar(np.arange(len(ARM_REWARDS)), np.asarray(ARM_REWARDS), color=colours)
    ax[0].set(title="(a) multi-armed bandit: reward", xlabel="action (arm)", ylabel="reward")
    for k in range(len(ARM_REWARDS)):
        ax[1].plot(probs[:, k], color=colours[k], label=f"arm {k} (r={float(ARM_REWARDS[k]):.2f})")
    # Mark the first update at which the probabilities are ordered exactly as the rewards (the arg-sort phase).
    ordered = np.flatnonzero((np.argsort(probs, 1) == np.argsort(np.asarray(ARM_REWARDS))).all(1))
    if len(ordered):
        ax[1].axvline(ordered[0], color="grey", ls=":", label=f"ranked as rewards (update {ordered[0]})")
    ax[1].set(
        title="(b) softmax policy, exact policy gradient",
        xlabel="update",
        ylabel="probability",
        xscale="symlog",
        xlim=(0, len(probs) - 1),
    )
    ax[1].legend(fontsize=7)
    a = np.linspace(-1, 1, 400)
    steps = np.arange(len(mu_delta))
    for panel, title in (
        (ax[2], "(c) delta policy, exact gradient"),
        (ax[3], f"(d) Gaussian policy (std {GAUSSIAN_POLICY_STD}), exact gradient"),
    ):
        panel.plot(a, np.asarray(reward_1d(a)), color="k", label="reward")
        panel.set(title=title, xlabel="action", ylabel="reward", xlim=(-1, 1))
    sc = ax[2].scatter(mu_delta, np.asarray(reward_1d(mu_delta)), c=steps, cmap="viridis", s=6, zorder=3)
    # (d): the policy's density at a few updates, scaled to the plot, coloured by update like (c)
    for t in np.unique(np.geomspace(1, len(mu_gauss), 8).astype(int) - 1):
        dens = np.exp(-((a - mu_gauss[t]) ** 2) / (2 * GAUSSIAN_POLICY_STD**2))
        ax[3].plot(a, 0.9 * dens, color=plt.cm.viridis(t / (len(mu_gauss) - 1)), lw=1.2)
    ax[3].scatter(mu_gauss, np.asarray(reward_1d(mu_gauss)), c=steps, cmap="viridis", s=6, zorder=3)
    fig.colorbar(sc, ax=ax[2:], label="update (colour of the policy in (c) and (d))", fraction=0.03)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------------
# Figure 2: a 2-D bandit, Q learned from sampled rewards, three ways of moving the delta
# ---------------------------------------------------------------------------------------------------------------
SUB_CENTRE, SUB_HEIGHT, SUB_WIDTH = jnp.array([-0.35, -0.35]), 0.6, 0.45  # broad, sub-optimal (about 80% basin)
OPT_CENTRE, OPT_HEIGHT, OPT_WIDTH = jnp.array([0.55, 0.55]), 1.0, 0.15  # narrow, optimal


def reward_2d(a):
    """Deterministic reward of actions a [..., 2] in [-1, 1]^2: two Gaussian bumps (peaks 0.6 and about 1.0)."""

    def bump(c, w):
        return jnp.exp(-jnp.sum((a - c) ** 2, -1) / (2 * w**2))

    return SUB_HEIGHT * bump(SUB_CENTRE, SUB_WIDTH) + OPT_HEIGHT * bump(OPT_CENTRE, OPT_WIDTH)


def in_optimal_mode(delta):
    """A delta 'sits in the optimal mode' when it is within one width of the optimal bump's centre."""
    return jnp.linalg.norm(delta - OPT_CENTRE, axis=-1) < OPT_WIDTH


class QNetwork(nn.Module):
    """Action-in Q(a) for the single-state bandit; shared by all three learners."""

    @nn.compact
    def __call__(self, a):
        x = nn.relu(nn.Dense(64)(a))
        x = nn.relu(nn.Dense(64)(x))
        return nn.Dense(1)(x)[..., 0]


def delta_action(theta):
    """The delta (DPG's actor, QMLE's arg-max predictor): a free point squashed into [-1, 1]^2. A bandit has one
    state, so the predictor needs no input."""
    return jnp.tanh(theta)


def qmle_candidates(key, delta, m_local, local_std, m_uniform):
    """Candidate set for the arg-max: the delta itself, Gaussian samples around it, uniform samples."""
    k_loc, k_uni = jax.random.split(key)
    local = jnp.clip(delta + local_std * jax.random.normal(k_loc, (m_local, 2)), -1, 1)
    uniform = jax.random.uniform(k_uni, (m_uniform, 2), minval=-1, maxval=1)
    return jnp.concatenate([delta[None], local, uniform])


def make_train(args: Args):
    """Returns train(key, learner, strategy) -> (final Q params, delta trajectory [num_steps + 1, 2]), pure and
    jittable, so that every (seed, learner, strategy) run trains at once under one jax.vmap."""
    q_net = QNetwork()
    q_opt, d_opt = optax.adam(args.q_learning_rate), optax.adam(args.delta_learning_rate)
    P, C = args.pulls_per_step, args.buffer_size

    def q_loss(q_params, a, r):
        return jnp.mean((q_net.apply(q_params, a) - r) ** 2)  # one-step: the regression target is the reward

    def train(key, learner, strategy):
        # The initialisation depends on the seed only: all learners and strategies start from the same Q and delta.
        k_q, k_d, k_loop = jax.random.split(key, 3)
        q_params = q_net.init(k_q, jnp.zeros((1, 2)))
        k_dir, k_rad = jax.random.split(k_d)
        angle = jax.random.uniform(k_dir, (), minval=0, maxval=2 * jnp.pi)
        radius = args.init_radius * jnp.sqrt(jax.random.uniform(k_rad, ()))  # uniform over the disc
        theta = jnp.arctanh(SUB_CENTRE + radius * jnp.array([jnp.cos(angle), jnp.sin(angle)]))
        carry = (
            q_params,
            q_opt.init(q_params),
            theta,
            d_opt.init(theta),
            jnp.zeros((C, 2)),
            jnp.zeros((C,)),
            jnp.zeros((P, 2)),
        )

        def step(carry, xs):
            t, k = xs
            q_params, q_state, theta, d_state, buf_a, buf_r, ou = carry
            k_eps, k_uni, k_noise, k_ou, k_batch, k_cand = jax.random.split(k, 6)
            delta = delta_action(theta)

            # Behaviour: the delta plus one of three exploration noises. All three are computed (cheap) and one is
            # selected, so that learner and strategy can be batched values under vmap.
            uniform = jax.random.uniform(k_uni, (P, 2), minval=-1, maxval=1)
            eps_greedy = jnp.where(jax.random.uniform(k_eps, (P, 1)) < args.epsilon, uniform, delta)
            gaussian = delta + args.gaussian_std * jax.random.normal(k_noise, (P, 2))
            ou = ou - args.ou_theta * ou + args.ou_sigma * jax.random.normal(k_ou, (P, 2))  # one process per pull
            actions = jnp.clip(jnp.stack([eps_greedy, gaussian, delta + ou])[strategy], -1, 1)

            idx = (t * P + jnp.arange(P)) % C
            buf_a, buf_r = buf_a.at[idx].set(actions), buf_r.at[idx].set(reward_2d(actions))
            batch = jax.random.randint(k_batch, (args.batch_size,), 0, jnp.minimum((t + 1) * P, C))
            grads = jax.grad(q_loss)(q_params, buf_a[batch], buf_r[batch])
            updates, q_state = q_opt.update(grads, q_state)
            q_params = optax.apply_updates(q_params, updates)

            # DPG: ascend the learned Q along its action gradient at the delta.
            g_dpg = jax.grad(lambda th: -q_net.apply(q_params, delta_action(th)))(theta)
            # QMLE: the best candidate under the learned Q is the target of a squared-error (delta MLE) step.
            cands = qmle_candidates(k_cand, delta, args.m_local, args.local_std, args.m_uniform)
            q_cands = q_net.apply(q_params, cands)
            is_uniform = jnp.arange(len(cands)) > args.m_local  # rows after the delta and the local samples
            only_local = learner == LEARNERS.index("qmle_local")
            q_cands = jnp.where(is_uniform & only_local, -jnp.inf, q_cands)
            target = jax.lax.stop_gradient(cands[jnp.argmax(q_cands)])
            g_qmle = jax.grad(lambda th: jnp.sum((delta_action(th) - target) ** 2))(theta)

            # Same optimiser and step size for both updates. Adam's steps do not scale with the gradient's size, so
            # local QMLE, whose targets lie about local_std away, moves about as fast as DPG: the two differ only in
            # the direction they are told. The delta is frozen until learning_starts.
            is_dpg = learner == LEARNERS.index("dpg")
            updates, new_d_state = d_opt.update(jnp.where(is_dpg, g_dpg, g_qmle), d_state)
            active = t >= args.learning_starts
            theta = jnp.where(active, theta + updates, theta)
            d_state = jax.tree.map(lambda new, old: jnp.where(active, new, old), new_d_state, d_state)
            return (q_params, q_state, theta, d_state, buf_a, buf_r, ou), delta_action(theta)

        xs = (jnp.arange(args.num_steps), jax.random.split(k_loop, args.num_steps))
        (q_params, *_), trajectory = jax.lax.scan(step, carry, xs)
        return q_params, jnp.concatenate([delta_action(theta)[None], trajectory])

    return train


def run_all(args: Args):
    """Trains every (seed, learner, strategy) run in one vmapped, jitted call. Returns final Q params and delta
    trajectories with leading axes [num_seeds, learner, strategy]."""
    seeds, learners, strategies = np.meshgrid(np.arange(args.num_seeds), np.arange(3), np.arange(3), indexing="ij")
    keys = jax.vmap(jax.random.PRNGKey)(jnp.asarray(args.seed + seeds.ravel()))
    train = jax.jit(jax.vmap(make_train(args)))
    q_params, traj = train(keys, jnp.asarray(learners.ravel()), jnp.asarray(strategies.ravel()))
    shape = (args.num_seeds, 3, 3)
    return jax.tree.map(lambda x: x.reshape(shape + x.shape[1:]), q_params), traj.reshape(shape + traj.shape[1:])


def summarise(trajectories):
    """Per learner and strategy: fraction of seeds whose final delta sits in the optimal mode, mean final reward."""
    final = trajectories[:, :, :, -1]
    frac, rew = np.asarray(in_optimal_mode(final).mean(0)), np.asarray(reward_2d(final).mean(0))
    return {
        f"{lrn}/{strat}": {"fraction_global": float(frac[i, j]), "final_reward": float(rew[i, j])}
        for i, lrn in enumerate(LEARNERS)
        for j, strat in enumerate(STRATEGIES)
    }


def plot_figure2(q_params, trajectories, results, path, seed_label):
    """Left: the true reward and the table of results. Right: per learner (columns) and strategy (rows), the first
    seed's learned Q at the end with the delta's trajectory (orange) and its end point (green)."""
    n = 81
    g = np.linspace(-1, 1, n)
    grid = jnp.asarray(np.stack(np.meshgrid(g, g), -1).reshape(-1, 2))
    levels = np.linspace(-0.1, 1.1, 13)  # one colour scale for every panel; extrapolated values saturate
    fig = plt.figure(figsize=(16, 11))
    spec = fig.add_gridspec(3, 4)
    ax0 = fig.add_subplot(spec[0, 0])
    cs = ax0.contourf(g, g, np.asarray(reward_2d(grid)).reshape(n, n), levels=levels, cmap="Blues", extend="both")
    ax0.set(title="(a) reward = true Q", xlabel="action 1", ylabel="action 2", aspect="equal")
    fig.colorbar(cs, ax=ax0, orientation="horizontal", fraction=0.05, pad=0.18, label="reward / learned Q")
    table = fig.add_subplot(spec[1:, 0])
    table.axis("off")
    lines = [
        f"fraction of {trajectories.shape[0]} seeds ending",
        "in the optimal mode",
        "",
        f"{'':<12}" + "".join(f"{s[:5]:>6}" for s in STRATEGIES),
    ]
    lines += [
        f"{lrn:<12}" + "".join(f"{results[f'{lrn}/{s}']['fraction_global']:>6.1f}" for s in STRATEGIES)
        for lrn in LEARNERS
    ]
    lines += [
        "",
        "exploration around the delta:",
        "epsilon: some pulls uniform",
        "gauss: Gaussian noise",
        "ou: Ornstein-Uhlenbeck noise",
        "",
        "Unvisited regions of the learned",
        "Q are extrapolated (saturated",
        "colours: beyond the scale).",
    ]
    table.text(0.0, 0.8, "\n".join(lines), family="monospace", fontsize=9, va="top")
    q_net = QNetwork()
    for i, lrn in enumerate(LEARNERS):
        for j, strat in enumerate(STRATEGIES):
            ax = fig.add_subplot(spec[j, i + 1])
            params = jax.tree.map(lambda x, i=i, j=j: x[0, i, j], q_params)
            ax.contourf(
                g, g, np.asarray(q_net.apply(params, grid)).reshape(n, n), levels=levels, cmap="Blues", extend="both"
            )
            tr = np.asarray(trajectories[0, i, j])
            ax.plot(tr[:, 0], tr[:, 1], color="orange", lw=2)
            ax.plot(*tr[0], "kx", ms=8)
            ax.plot(*tr[-1], "o", color="limegreen", ms=9, mec="k")
            ax.plot(*np.asarray(OPT_CENTRE), "r+", ms=10)
            ax.set(
                title=f"{lrn} / {strat}",
                xlim=(-1, 1),
                ylim=(-1, 1),
                aspect="equal",
                xlabel="action 1" if strat == STRATEGIES[-1] else None,
                ylabel="action 2" if lrn == LEARNERS[0] else None,
            )
    fig.suptitle(
        f"(b) learned Q at the end with the delta's trajectory (orange; start x, end green; red + = "
        f"optimum), seed {seed_label}"
    )
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)


def main(args: Args):
    check_args(args)
    try:
        os.makedirs(args.output_dir, exist_ok=True)
    except OSError as error:
        raise SystemExit(f"error: --output-dir {args.output_dir} cannot be created: {error.strerror}") from None
    start = time.time()

    probs, mu_delta, mu_gauss = figure1_trajectories(jax.random.PRNGKey(args.seed), args.fig1_steps)
    plot_figure1(probs, mu_delta, mu_gauss, os.path.join(args.output_dir, "bandit_fig1.png"))
    print(
        f"Figure 1: softmax ends with p(best arm) = {float(probs[-1, jnp.argmax(ARM_REWARDS)]):.3f}; "
        f"delta ends at {float(mu_delta[-1]):+.3f}, Gaussian mean at {float(mu_gauss[-1]):+.3f} "
        f"(optimum at {BUMPS_1D[1][1]:+.2f})"
    )

    q_params, trajectories = run_all(args)
    results = summarise(trajectories)
    plot_figure2(q_params, trajectories, results, os.path.join(args.output_dir, "bandit_fig2.png"), args.seed)
    with open(os.path.join(args.output_dir, "bandit_results.json"), "w") as f:
        json.dump(results, f, indent=2)

    print(
        f"\nFigure 2, {args.num_seeds} seeds: fraction of seeds ending in the optimal mode (mean final reward; "
        f"optimum {float(reward_2d(OPT_CENTRE)):.3f}, sub-optimal peak {SUB_HEIGHT})"
    )
    print(f"{'learner':<12}" + "".join(f"{s:>18}" for s in STRATEGIES))
    for lrn in LEARNERS:
        cells = (results[f"{lrn}/{s}"] for s in STRATEGIES)
        print(f"{lrn:<12}" + "".join(f"{c['fraction_global']:>9.1f} ({c['final_reward']:.3f})" for c in cells))
    print(
        f"\nwrote {args.output_dir}/bandit_fig1.png, bandit_fig2.png, bandit_results.json "
        f"in {time.time() - start:.1f} s"
    )


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `--help | head -1` ends quietly, as other commands do
    parsed = tyro.cli(Args)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    main(parsed)
