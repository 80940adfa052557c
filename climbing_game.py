"""Why QMLE suits cooperative multi-agent learning: a joint Q with decentralised arg-max predictors.

The climbing game (Claus & Boutilier 1998) made continuous: two agents each act in [-1, 1], whose thirds are the
three actions. Linear value decomposition (VDN, Q = U1(a1) + U2(a2), each agent maximising its own utility)
cannot represent the payoff table and settles on the safe joint action worth 5. QMLE learns one unconstrained
joint Q(a1, a2) and one arg-max predictor per agent, trained by maximum likelihood toward the joint arg-max; each
agent then acts from its own predictor and observation alone (decentralised execution) and the pair reaches 11.
Paper: Tavakoli et al. 2024, "Learning in complex action spaces without policy gradients" (arXiv 2410.06317),
Appendix E.2, Figure 11.  Reproduce: python climbing_game.py  (writes to runs/climbing_game/; --output-dir docs/figures
updates the committed figures)
"""

import json
import math
import os
import signal
import time
from dataclasses import dataclass

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
    """seed of the first run; seed index i uses seed + i (the same for VDN and QMLE)"""
    num_seeds: int = 10
    """seeds per method (all trained at once under jax.vmap)"""
    output_dir: str = "runs/climbing_game"
    """folder for climbing_game.png and climbing_results.json (created if missing; docs/figures holds the committed
    ones)"""
    num_steps: int = 1500
    """training steps; each step plays the game `plays_per_step` times and makes one update"""
    learning_starts: int = 200
    """steps of uniformly random play before the agents act greedily (their networks learn throughout)"""
    plays_per_step: int = 16
    """games played per step, each with fresh observations and exploration"""
    buffer_size: int = 32768
    """plays kept for the regression of Q (the most recent ones; the default keeps all of them, so that the
    uniform early plays keep Q accurate away from where the agents end up)"""
    batch_size: int = 64
    """plays per Q (or utility) update"""
    learning_rate: float = 2e-3
    """Adam step size of every network (utilities, joint Q, arg-max predictors)"""
    epsilon: float = 0.3
    """probability that an agent acts uniformly in [-1, 1] instead of greedily (independently per agent)"""
    obs_dim: int = 2
    """size of each agent's private observation (uniform noise: the game has one state, but every utility and
    predictor only sees its own agent's observation, as in decentralised execution)"""
    m_greedy: int = 32
    """VDN: uniform candidates per agent for the approximate arg-max of its utility"""
    m_uniform: int = 64
    """QMLE: uniform joint candidates per arg-max approximation"""
    m_local: int = 16
    """QMLE: joint candidates sampled around the two predictors' outputs (std `local_std`)"""
    local_std: float = 0.05
    """QMLE: std of the local candidates"""
    argmax_batch_size: int = 32
    """QMLE: observation pairs per predictor update (each gets its own arg-max approximation)"""


PAYOFF = jnp.array(
    [[11.0, -30.0, 0.0], [-30.0, 7.0, 6.0], [0.0, 0.0, 5.0]]
)  # rows: agent 1's action, columns: agent 2's action


def check_args(args: Args) -> None:
    """Fail early with one line (SystemExit prints it on stderr, exit status 1), never a traceback."""
    for name, value in vars(args).items():
        if isinstance(value, float) and not math.isfinite(value):
            raise SystemExit(f"error: --{name.replace('_', '-')} must be a finite number, got {value}")
    for name in (
        "num_seeds",
        "num_steps",
        "plays_per_step",
        "buffer_size",
        "batch_size",
        "obs_dim",
        "m_greedy",
        "m_uniform",
        "m_local",
        "argmax_batch_size",
    ):
        if getattr(args, name) < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0 <= args.seed <= 2**31 - args.num_seeds:  # the runs' seeds, --seed + i, go to the device as int32
        raise SystemExit(
            f"error: --seed must be in [0, {2**31 - args.num_seeds}] with --num-seeds {args.num_seeds}, got {args.seed}"
        )
    if args.buffer_size < args.plays_per_step:  # a step's plays would overwrite each other
        raise SystemExit(
            f"error: --buffer-size must hold the {args.plays_per_step} plays written per step "
            f"(--plays-per-step), got {args.buffer_size}"
        )
    if not 0 <= args.learning_starts < args.num_steps:
        raise SystemExit(f"error: --learning-starts must be in [0, --num-steps), got {args.learning_starts}")
    if not 0.0 <= args.epsilon <= 1.0:
        raise SystemExit(f"error: --epsilon must be in [0, 1], got {args.epsilon}")
    for name in ("learning_rate", "local_std"):
        if not getattr(args, name) > 0:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    per_run = args.buffer_size * (2 * args.obs_dim + 3) + args.num_steps
    per_run += 2 * args.argmax_batch_size * (args.m_uniform + args.m_local) + args.m_greedy * args.batch_size
    need, memory = 4 * 2 * args.num_seeds * per_run, os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if need > memory:  # every run's plays, greedy rewards and candidates, all at once under vmap
        raise SystemExit(
            f"error: --num-seeds {args.num_seeds} (2 runs each, --buffer-size {args.buffer_size}, --obs-dim "
            f"{args.obs_dim}, --num-steps {args.num_steps}) needs {need / 2**30:.3g} GiB, more than this machine's "
            f"{memory / 2**30:.3g} GiB"
        )
    out = os.path.abspath(args.output_dir)
    if os.path.exists(out) and not os.path.isdir(out):
        raise SystemExit(f"error: --output-dir {args.output_dir} exists and is not a folder")


def action_index(a):
    """Continuous action in [-1, 1] -> discrete action by thirds: [-1, -1/3) -> 0, [-1/3, 1/3) -> 1, [1/3, 1] -> 2."""
    return jnp.clip(jnp.floor((a + 1.0) * 1.5), 0, 2).astype(jnp.int32)


def payoff(a1, a2):
    """Shared reward of the continuous joint action (a1, a2)."""
    return PAYOFF[action_index(a1), action_index(a2)]


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(64)(x))
        x = nn.relu(nn.Dense(64)(x))
        return nn.Dense(1)(x)[..., 0]


class VDN(nn.Module):
    """Q(o1, o2, a1, a2) = U1(o1, a1) + U2(o2, a2): action-in utilities, one per agent, each on its own inputs."""

    def setup(self):
        self.u1, self.u2 = MLP(), MLP()

    def __call__(self, o1, o2, a1, a2):
        return self.u1(jnp.concatenate([o1, a1[..., None]], -1)) + self.u2(jnp.concatenate([o2, a2[..., None]], -1))

    def utilities(self, o1, o2, a1, a2):
        return (self.u1(jnp.concatenate([o1, a1[..., None]], -1)), self.u2(jnp.concatenate([o2, a2[..., None]], -1)))


class JointQNetwork(nn.Module):
    """Unconstrained action-in joint Q(o1, o2, a1, a2) (centralised training only)."""

    @nn.compact
    def __call__(self, o1, o2, a1, a2):
        return MLP()(jnp.concatenate([o1, o2, a1[..., None], a2[..., None]], -1))


class DeltaArgmaxPredictor(nn.Module):
    """One agent's arg-max predictor: its own observation -> its action in [-1, 1] (a delta distribution)."""

    @nn.compact
    def __call__(self, obs):
        return jnp.tanh(MLP()(obs))


def vdn_greedy(params, key, o1, o2, m):
    """Each agent maximises its own utility over m uniform candidates, seeing only its own observation."""
    net = VDN()
    cands = jax.random.uniform(key, (2, o1.shape[0], m), minval=-1, maxval=1)
    tile = lambda o: jnp.broadcast_to(o[:, None], (o.shape[0], m, o.shape[-1]))  # noqa: E731
    u1, u2 = net.apply(params, tile(o1), tile(o2), cands[0], cands[1], method=VDN.utilities)
    pick = lambda c, u: jnp.take_along_axis(c, jnp.argmax(u, -1)[:, None], -1)[:, 0]  # noqa: E731
    return pick(cands[0], u1), pick(cands[1], u2)


def qmle_argmax_targets(q_params, key, o1, o2, d1, d2, m_uniform, m_local, local_std):
    """Approximate joint arg-max of Q per observation pair over: the predictors' joint action (d1, d2), Gaussian
    samples around it, and uniform joint samples. Returns the two agents' target actions."""
    n = o1.shape[0]
    k_loc, k_uni = jax.random.split(key)
    delta = jnp.stack([d1, d2], -1)[:, None]  # [n, 1, 2]
    local = jnp.clip(delta + local_std * jax.random.normal(k_loc, (n, m_local, 2)), -1, 1)
    uniform = jax.random.uniform(k_uni, (n, m_uniform, 2), minval=-1, maxval=1)
    cands = jnp.concatenate([delta, local, uniform], 1)
    m = cands.shape[1]
    tile = lambda o: jnp.broadcast_to(o[:, None], (n, m, o.shape[-1]))  # noqa: E731
    q = JointQNetwork().apply(q_params, tile(o1), tile(o2), cands[..., 0], cands[..., 1])
    best = jnp.take_along_axis(cands, jnp.argmax(q, -1)[:, None, None], 1)[:, 0]
    return best[:, 0], best[:, 1]


def make_train(args: Args, method: str):
    """Returns train(key) -> reward of the greedy joint action at every step [num_steps], pure and jittable, for
    method "vdn" or "qmle"; one jax.vmap over keys trains all seeds at once."""
    opt = optax.adam(args.learning_rate)
    P, C, D = args.plays_per_step, args.buffer_size, args.obs_dim
    q_net = VDN() if method == "vdn" else JointQNetwork()
    predictor = DeltaArgmaxPredictor()

    def q_loss(q_params, o1, o2, a1, a2, r):
        return jnp.mean((q_net.apply(q_params, o1, o2, a1, a2) - r) ** 2)  # one-step game: the target is r

    def predictor_loss(p_params, obs, target):
        return jnp.mean((predictor.apply(p_params, obs) - target) ** 2)  # MLE of a fixed-variance Gaussian/delta

    def train(key):
        k_q, k_p1, k_p2, k_loop = jax.random.split(key, 4)
        zeros = jnp.zeros((1, D)), jnp.zeros((1,))
        q_params = q_net.init(k_q, zeros[0], zeros[0], zeros[1], zeros[1])
        p_params = (predictor.init(k_p1, zeros[0]), predictor.init(k_p2, zeros[0]))  # used by QMLE only
        buffer = dict(o1=jnp.zeros((C, D)), o2=jnp.zeros((C, D)), a1=jnp.zeros(C), a2=jnp.zeros(C), r=jnp.zeros(C))
        carry = (q_params, opt.init(q_params), p_params, opt.init(p_params), buffer)

        def step(carry, xs):
            t, k = xs
            q_params, q_state, p_params, p_state, buf = carry
            k_obs, k_greedy, k_explore, k_uni, k_batch, k_arg, k_arg_batch = jax.random.split(k, 7)

            # Act: each agent from its own observation only, epsilon-greedy (uniform before learning_starts).
            o1, o2 = jax.random.uniform(k_obs, (2, P, D), minval=-1, maxval=1)
            if method == "vdn":
                g1, g2 = vdn_greedy(q_params, k_greedy, o1, o2, args.m_greedy)
            else:
                g1, g2 = predictor.apply(p_params[0], o1), predictor.apply(p_params[1], o2)
            eps = jnp.where(t < args.learning_starts, 1.0, args.epsilon)
            explore = jax.random.uniform(k_explore, (2, P)) < eps
            uniform = jax.random.uniform(k_uni, (2, P), minval=-1, maxval=1)
            a1, a2 = jnp.where(explore[0], uniform[0], g1), jnp.where(explore[1], uniform[1], g2)

            idx = (t * P + jnp.arange(P)) % C
            play = dict(o1=o1, o2=o2, a1=a1, a2=a2, r=payoff(a1, a2))
            buf = {name: buf[name].at[idx].set(play[name]) for name in buf}

            # Regress Q (VDN's sum of utilities, or QMLE's joint Q) on the stored rewards.
            batch = jax.random.randint(k_batch, (args.batch_size,), 0, jnp.minimum((t + 1) * P, C))
            b = {name: buf[name][batch] for name in buf}
            grads = jax.grad(q_loss)(q_params, b["o1"], b["o2"], b["a1"], b["a2"], b["r"])
            updates, q_state = opt.update(grads, q_state)
            q_params = optax.apply_updates(q_params, updates)

            if method == "qmle":
                # Centralised training: the joint arg-max of Q for stored observation pairs is each agent's target.
                ab = jax.random.randint(k_arg_batch, (args.argmax_batch_size,), 0, jnp.minimum((t + 1) * P, C))
                po1, po2 = buf["o1"][ab], buf["o2"][ab]
                d1, d2 = predictor.apply(p_params[0], po1), predictor.apply(p_params[1], po2)
                t1, t2 = qmle_argmax_targets(
                    q_params, k_arg, po1, po2, d1, d2, args.m_uniform, args.m_local, args.local_std
                )
                grads = (jax.grad(predictor_loss)(p_params[0], po1, t1), jax.grad(predictor_loss)(p_params[1], po2, t2))
                updates, p_state = opt.update(grads, p_state)
                p_params = optax.apply_updates(p_params, updates)

            # What the agents would get acting greedily, on this step's observations.
            greedy_reward = jnp.mean(payoff(g1, g2))
            return (q_params, q_state, p_params, p_state, buf), greedy_reward

        xs = (jnp.arange(args.num_steps), jax.random.split(k_loop, args.num_steps))
        _, greedy_rewards = jax.lax.scan(step, carry, xs)
        return greedy_rewards

    return train


def run_all(args: Args):
    """Greedy-reward curves [num_seeds, num_steps] for both methods, each in one vmapped, jitted call."""
    keys = jax.vmap(jax.random.PRNGKey)(jnp.arange(args.seed, args.seed + args.num_seeds))
    return {m: np.asarray(jax.jit(jax.vmap(make_train(args, m)))(keys)) for m in ("vdn", "qmle")}


def plot_curves(curves, learning_starts, path):
    fig, (table, ax) = plt.subplots(1, 2, figsize=(10, 4), gridspec_kw=dict(width_ratios=[1, 2.4]))
    table.imshow(np.asarray(PAYOFF), cmap="RdBu", vmin=-30, vmax=30)  # the game itself, as the paper shows it
    for (i, j), value in np.ndenumerate(np.asarray(PAYOFF)):
        table.text(
            j,
            i,
            f"{value:g}",
            ha="center",
            va="center",
            fontsize=13,
            weight="bold" if value == 11 else None,
            color="white" if value < 0 else "black",
        )  # legible on the dark cells
    thirds = ["[-1, -1/3)", "[-1/3, 1/3)", "[1/3, 1]"]
    table.set(
        xticks=range(3),
        yticks=range(3),
        xticklabels=thirds,
        yticklabels=thirds,
        title="payoff",
        xlabel="agent 2's action",
        ylabel="agent 1's action",
    )
    table.tick_params(labelsize=7)
    for method, colour, label in (
        ("vdn", "tab:gray", "VDN (Q = U1 + U2)"),  # QMLE is blue in every figure
        ("qmle", "tab:blue", "QMLE (joint Q, decentralised arg-max predictors)"),
    ):
        c = curves[method]
        ax.plot(c.T, color=colour, alpha=0.25, lw=0.8)
        ax.plot(c.mean(0), color=colour, lw=2.2, label=f"{label}, mean of {len(c)} seeds")
    for level in (5, 7, 11):
        ax.axhline(level, color="grey", ls=":", lw=0.8)
    ax.axvline(learning_starts, color="k", ls="--", lw=0.8, label="end of uniformly random play")
    ax.set(
        xlabel="training step",
        ylabel="reward of the greedy joint action",
        ylim=(-32, 13),
        yticks=[-30, -20, -10, 0, 5, 7, 11],
        title="Continuous climbing game",
    )
    ax.legend(loc="lower right", fontsize=8)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main(args: Args):
    check_args(args)
    try:
        os.makedirs(args.output_dir, exist_ok=True)
    except OSError as error:
        raise SystemExit(f"error: --output-dir {args.output_dir} cannot be created: {error.strerror}") from None
    start = time.time()
    curves = run_all(args)
    plot_curves(curves, args.learning_starts, os.path.join(args.output_dir, "climbing_game.png"))
    results = {m: [float(r) for r in c[:, -1]] for m, c in curves.items()}  # greedy reward after the last step
    with open(os.path.join(args.output_dir, "climbing_results.json"), "w") as f:
        json.dump(results, f, indent=2)
    for m, finals in results.items():
        print(
            f"{m:>5}: final greedy reward per seed {[round(r, 2) for r in finals]}; "
            f"{sum(r == 11 for r in finals)}/{len(finals)} seeds at 11, {sum(r == 5 for r in finals)} at 5"
        )
    print(f"wrote {args.output_dir}/climbing_game.png, climbing_results.json in {time.time() - start:.1f} s")


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `--help | head -1` ends quietly, as other commands do
    parsed = tyro.cli(Args)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    main(parsed)
