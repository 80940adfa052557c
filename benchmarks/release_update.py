"""Does qmle_dmc.py compute what the authors' release computes? Both programs on the same inputs, compared.

    python benchmarks/release_update.py --release-dir ../qmle --torch-python ../qmle-venv/bin/python

The release's side runs in a second Python, one with PyTorch and the release's requirements (not this project's),
and imports the release's network (src/model.py) and environment wrapper (src/gym_dmc_env.py) from a clone of
https://github.com/atavakol/qmle. Three checks:

- the environment: walker-walk, the same seed and the same 1000 actions through both programs' DeepMind Control
  wrappers: the same rewards and the same observation values (the two order an observation's parts differently);
- the initial networks: Q values, the greedy action over 1000 uniform candidates and the predictors' outputs on
  the same inputs, over many initialisations of each; their draws differ, their statistics should not;
- one update, for each categorical loss (the release's softmax-twice, and the paper's, this script's default, for
  which the release's heads lose their final softmax): the release's network holding this script's parameters
  (online and target), the same replayed batch, importance weights and target candidates; the losses, refreshed
  arg-maxes, new priorities and every parameter's gradient. Gradients, not Adam steps, are compared: Adam's first
  step is the learning rate times the gradient's sign, blind to a wrong scale.

Not checked here: Adam itself (optax's and PyTorch's, one published algorithm); how each program draws its
candidates, prioritised batches and random actions (this project's tests check its draws against their
distributions; the release's are known by reading); the loop around the update (when updates and target copies
happen). Exits 1 with one line per check that differs beyond its tolerance.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import types

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
OBS_DIM, ACTION_DIM, NUM_BINS, BATCH, STATES = 24, 6, 3, 256, 64  # walker-walk's sizes; STATES for the init check
TARGET_CONTINUOUS, TARGET_GRID, GREEDY_CANDIDATES = 45, 55, 1000  # given target candidates: continuous, then grid
LOSSES = ("softmax-twice", "logits")  # the release's categorical loss, then the paper's (this script's default)
# Arrays cross between the two sides in .npz files, named by prefix: "batch/<field>" a replayed transition's field,
# "online/<param>" and "target/<param>" this script's parameters ("obs_embed/kernel", ...), and per categorical loss
# "<loss>/grad/<param>", "<loss>/loss/<name>", "<loss>/priorities" and "<loss>/refreshed_argmax".
INIT_STATISTICS = (
    "mean Q",
    "spread of Q over a state's candidates",
    "spread of mean Q over states",
    "mean |greedy action|",
    "mean |delta prediction|",
    "spread of categorical logits",
)
TOLERANCE = dict(loss=1e-4, priorities=1e-4, gradient=1e-3, init_z=4.0)  # relative; init: standard errors


def shared_inputs(rng: np.random.Generator) -> dict:
    f32 = lambda x: np.asarray(x, np.float32)  # noqa: E731
    uniform = lambda *shape: f32(rng.uniform(-1, 1, shape))  # noqa: E731
    return {
        "batch/obs": f32(rng.normal(size=(BATCH, OBS_DIM))),
        "batch/action": uniform(BATCH, ACTION_DIM),
        "batch/reward": f32(rng.uniform(0, 1, BATCH)),
        "batch/next_obs": f32(rng.normal(size=(BATCH, OBS_DIM))),
        "batch/terminated": np.zeros(BATCH, np.float32),
        "batch/argmax": uniform(BATCH, ACTION_DIM),
        "weights": f32(rng.uniform(0.3, 1.0, BATCH)),  # importance weights, as a prioritised replay gives them
        "target_candidates": np.concatenate(
            [
                uniform(BATCH, TARGET_CONTINUOUS, ACTION_DIM),
                f32(rng.choice([-1.0, 0.0, 1.0], (BATCH, TARGET_GRID, ACTION_DIM))),
            ],
            1,
        ),  # each side adds the cached arg-max
        "init_obs": f32(rng.normal(size=(STATES, OBS_DIM))),
        "init_candidates": uniform(STATES, GREEDY_CANDIDATES, ACTION_DIM),
        "env_actions": uniform(1000, ACTION_DIM),
    }


def init_statistics(q_values: np.ndarray, candidates: np.ndarray, delta: np.ndarray, logits: np.ndarray) -> list:
    greedy = candidates[np.arange(len(candidates)), q_values.argmax(1)]
    return [
        q_values.mean(),
        q_values.std(1).mean(),
        q_values.mean(1).std(),
        np.abs(greedy).mean(),
        np.abs(delta).mean(),
        logits.std(),
    ]


def rollout(first_obs, step, actions) -> dict:
    """The environment check's record on either side: each observation, the first included, and each reward."""
    observations, rewards = [first_obs], []
    for action in actions:
        obs, reward = step(action)[:2]
        observations.append(obs)
        rewards.append(reward)
    return {"env_rewards": np.array(rewards), "env_observations": np.array(observations, np.float32)}


def ours(data: dict, inits: int, env_seed: int) -> dict:
    """qmle_dmc.py's side: its gradient_step, with its sampling replaced by the shared batch and candidates."""
    import flax
    import jax
    import jax.numpy as jnp
    import optax

    sys.path.insert(0, ROOT)
    import qmle_dmc as q

    model = q.QMLENetwork(ACTION_DIM, NUM_BINS)

    @jax.jit
    def init(seed):
        key = jax.random.PRNGKey(seed)
        params = model.init(key, jnp.zeros((1, OBS_DIM)), jnp.zeros((1, 1, ACTION_DIM)))
        return q.release_init(params, jax.random.fold_in(key, 1), "uniform", "whole")  # the defaults' init

    def flat(params):
        return {"/".join(k): np.asarray(v) for k, v in flax.traverse_util.flatten_dict(params["params"]).items()}

    online, target = init(1), init(2)
    out = {**{"online/" + k: v for k, v in flat(online).items()}, **{"target/" + k: v for k, v in flat(target).items()}}
    batch = {k.split("/")[1]: jnp.asarray(v) for k, v in data.items() if k.startswith("batch/")}
    q.sample_candidates = lambda *args, **kwargs: jnp.asarray(data["target_candidates"])
    q.buffer_sample = lambda *args, **kwargs: (jnp.arange(BATCH), batch, jnp.asarray(data["weights"]))
    # An "optimizer" that leaves the parameters alone and keeps the gradient as its state, to read it exactly.
    keep_gradient = optax.GradientTransformation(
        lambda params: jax.tree.map(jnp.zeros_like, params),
        lambda grads, state, params=None: (jax.tree.map(jnp.zeros_like, grads), grads),
    )
    for loss in LOSSES:
        state = q.QMLEState.create(apply_fn=None, params=online, tx=keep_gradient, target_params=target)
        buffer = q.buffer_init(jax.tree.map(lambda x: x[0], batch), BATCH)
        settings = dict(
            vars(q.Args()),
            gamma=0.99,
            batch_size=BATCH,
            delta_noise_std=0.1,
            prioritized_replay=True,
            priority_exponent=0.6,
            importance_exponent=0.2,
            priority_epsilon=1e-6,
            categorical_loss=loss,
            predictor_target="cached",
            importance_normalisation="batch",
        )  # "batch": the shared weights
        budget = q.Budget(TARGET_CONTINUOUS, TARGET_GRID, 0, 0)  # labels the metrics' sources only: given above
        cfg = q.UpdateConfig(budget, 1, *(settings[k] for k in q.UpdateConfig._fields[2:]))
        stepped, buffer, metrics = q.gradient_step(model, state, buffer, jax.random.PRNGKey(0), cfg, False)
        leaves = buffer.tree.shape[0] // 2
        out.update({f"{loss}/grad/{k}": v for k, v in flat(stepped.opt_state).items()})
        out.update({f"{loss}/loss/{k.split('/')[1]}": np.asarray(v) for k, v in metrics.items() if "losses/" in k})
        out[f"{loss}/priorities"] = np.asarray(buffer.tree[leaves : leaves + BATCH]) ** (1 / 0.6)  # stored ** alpha
        out[f"{loss}/refreshed_argmax"] = np.asarray(buffer.storage["argmax"])

    @jax.jit
    def outputs(params):
        embedding, delta, logits = model.apply(params, data["init_obs"], method=q.QMLENetwork.heads)
        return model.apply(params, embedding, data["init_candidates"], method=q.QMLENetwork.q_values), delta, logits

    stats = []
    for seed in range(inits):
        q_values, delta, logits = (np.asarray(x) for x in outputs(init(1000 + seed)))
        stats.append(init_statistics(q_values, data["init_candidates"], delta, logits))
    out["init_stats"] = np.array(stats)
    env = q.make_env("walker-walk", env_seed)
    return {**out, **rollout(env.reset(seed=env_seed)[0], env.step, data["env_actions"])}


def release(data: dict, release_dir: str, layernorm_eps: float, inits: int, env_seed: int) -> dict:
    """The release's side, in a Python with PyTorch: its network's modules, and its training step's loss
    (src/qmle.py: weighted squared TD error, cross-entropy of each head's output, squared error of the delta)."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(1)  # small matrices: threads only contend
    sys.path.insert(0, release_dir)
    from src.gym_dmc_env import make_gym_dmc_env
    from src.model import QMLENetwork

    box = lambda shape: types.SimpleNamespace(
        shape=shape,
        low=-np.ones(shape, np.float32),  # noqa: E731
        high=np.ones(shape, np.float32),
    )
    env = types.SimpleNamespace(single_action_space=box((ACTION_DIM,)), single_observation_space=box((OBS_DIM,)))
    tensor = lambda x: torch.from_numpy(np.asarray(x))  # noqa: E731

    def network(prefix=None, loss="softmax-twice"):
        """The release's QMLENetwork, holding our parameters stored under `prefix` when one is given: our Dense
        kernels are its weights transposed, our split joint layer its one Linear on the concatenation, and our one
        categorical head its per-dimension heads side by side. The paper's loss reads the heads' logits."""
        net = QMLENetwork(env, num_categories=NUM_BINS)
        for module in net.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.eps = layernorm_eps
        if loss == "logits":
            for head in net.categorical_predictor:
                head[1] = torch.nn.Identity()  # its Softmax
        if prefix is None:
            return net
        param = lambda name: tensor(data[prefix + name])  # noqa: E731

        def linear(module, name, kernel=None, bias=None):
            module.weight.data.copy_((param(name + "/kernel") if kernel is None else kernel).T)
            module.bias.data.copy_(param(name + "/bias") if bias is None else bias)

        def norm(module, name):
            module.weight.data.copy_(param(name + "/scale"))
            module.bias.data.copy_(param(name + "/bias"))

        linear(net.obs_encoder[0], "obs_embed")
        linear(net.obs_encoder[1].layer[0], "obs_block/Dense_0")
        linear(net.obs_encoder[1].layer[2], "obs_block/Dense_1")
        norm(net.obs_encoder[1].layer_norm, "obs_norm")
        linear(net.act_encoder[0], "act_embed")
        norm(net.act_encoder[1], "act_norm")
        joint = net._obs_act_encoder
        linear(
            joint[0].layer[0],
            "joint_in_obs",
            kernel=torch.cat([param("joint_in_obs/kernel"), param("joint_in_act/kernel")]),
        )
        linear(joint[0].layer[2], "joint_out")
        norm(joint[0].layer_norm, "joint_norm")
        linear(joint[2], "q_head")
        linear(net.delta_predictor[0], "delta_hidden")
        linear(net.delta_predictor[2], "delta_head")
        linear(net.categorical_torso[0], "categorical_hidden")
        for d, head in enumerate(net.categorical_predictor):
            columns = slice(NUM_BINS * d, NUM_BINS * (d + 1))
            linear(
                head[0],
                "categorical_head",
                kernel=param("categorical_head/kernel")[:, columns],
                bias=param("categorical_head/bias")[columns],
            )
        return net

    def q_of_candidates(net, obs, candidates):  # the end of the release's forward pass, with candidates given
        latent = net.obs_encoder(obs).unsqueeze(1).expand(-1, candidates.shape[1], -1)
        return net._obs_act_encoder(torch.cat([latent, net.act_encoder(candidates)], -1)).squeeze(-1)

    batch = {k.split("/")[1]: tensor(v) for k, v in data.items() if k.startswith("batch/")}
    out = {}
    for loss in LOSSES:
        online, target = network("online/", loss), network("target/", loss)
        with torch.no_grad():
            candidates = torch.cat([tensor(data["target_candidates"]), batch["argmax"][:, None]], 1)
            next_q = q_of_candidates(target, batch["next_obs"], candidates)
            td_target = batch["reward"] + 0.99 * (1 - batch["terminated"]) * next_q.max(1).values
            refreshed = candidates[torch.arange(BATCH), next_q.argmax(1)]
        q_taken = online(batch["obs"], act=batch["action"]).squeeze(-1)
        td_loss = (tensor(data["weights"]) * (q_taken - td_target) ** 2).mean()
        bins = online.map_continuous_to_bins(batch["argmax"])  # the predictors learn toward the cached arg-max
        heads = online.get_categorical_predictor_outputs(batch["next_obs"])
        categorical_loss = torch.stack([F.cross_entropy(h, bins[:, d]) for d, h in enumerate(heads)]).mean()
        delta_loss = ((online.get_delta_predictor_outputs(batch["next_obs"]) - batch["argmax"]) ** 2).mean()
        (td_loss + categorical_loss + delta_loss).backward()
        gradients = network(loss=loss)  # a network whose parameters are set to the gradients, read as ours
        for slot, parameter in zip(gradients.parameters(), online.parameters()):
            slot.data.copy_(parameter.grad)
        out.update({f"{loss}/grad/{k}": v for k, v in as_our_layout(gradients).items()})
        out.update(
            {
                f"{loss}/loss/td_loss": td_loss.item(),
                f"{loss}/loss/delta_mle_loss": delta_loss.item(),
                f"{loss}/loss/categorical_mle_loss": categorical_loss.item(),
                f"{loss}/priorities": (q_taken - td_target).abs().detach().numpy() + 1e-6,
                f"{loss}/refreshed_argmax": refreshed.numpy(),
            }
        )
    stats = []
    with torch.no_grad():
        for seed in range(inits):
            torch.manual_seed(1000 + seed)
            net = network()
            obs, candidates = tensor(data["init_obs"]), tensor(data["init_candidates"])
            latent = net.obs_encoder(obs)
            logits = torch.stack([head[0](net.categorical_torso(latent)) for head in net.categorical_predictor], 1)
            stats.append(
                init_statistics(
                    q_of_candidates(net, obs, candidates).numpy(),
                    data["init_candidates"],
                    net.delta_predictor(latent).numpy(),
                    logits.numpy(),
                )
            )
    out["init_stats"] = np.array(stats)
    dmc = make_gym_dmc_env("walker_walk", seed=env_seed)
    return {**out, **rollout(dmc.reset(), dmc.step, data["env_actions"])}


def as_our_layout(net) -> dict:
    """The release network's parameters (here: gradients) under our names and shapes: network()'s loading undone."""
    weight = lambda m: m.weight.detach().numpy().T  # noqa: E731
    bias = lambda m: m.bias.detach().numpy()  # noqa: E731
    out = {}
    for name, m in [
        ("obs_embed", net.obs_encoder[0]),
        ("obs_block/Dense_0", net.obs_encoder[1].layer[0]),
        ("obs_block/Dense_1", net.obs_encoder[1].layer[2]),
        ("act_embed", net.act_encoder[0]),
        ("joint_out", net._obs_act_encoder[0].layer[2]),
        ("q_head", net._obs_act_encoder[2]),
        ("delta_hidden", net.delta_predictor[0]),
        ("delta_head", net.delta_predictor[2]),
        ("categorical_hidden", net.categorical_torso[0]),
    ]:
        out[name + "/kernel"], out[name + "/bias"] = weight(m), bias(m)
    for name, m in [
        ("obs_norm", net.obs_encoder[1].layer_norm),
        ("act_norm", net.act_encoder[1]),
        ("joint_norm", net._obs_act_encoder[0].layer_norm),
    ]:
        out[name + "/scale"], out[name + "/bias"] = m.weight.detach().numpy(), bias(m)
    joint = net._obs_act_encoder[0].layer[0]
    out["joint_in_obs/kernel"], out["joint_in_act/kernel"] = np.split(weight(joint), 2)
    out["joint_in_obs/bias"] = bias(joint)
    heads = [head[0] for head in net.categorical_predictor]
    out["categorical_head/kernel"] = np.concatenate([weight(h) for h in heads], 1)
    out["categorical_head/bias"] = np.concatenate([bias(h) for h in heads])
    return out


def compare(ours_out: dict, release_out: dict) -> list:
    """Print the comparison; return one line for each check beyond its tolerance."""
    failures = []
    relative = lambda x, y: float(np.max(np.abs(x - y)) / max(np.max(np.abs(y)), 1e-30))  # noqa: E731
    rewards, observations = (
        (ours_out["env_rewards"], release_out["env_rewards"]),
        [np.sort(o, axis=1) for o in (ours_out["env_observations"], release_out["env_observations"])],
    )
    same_rewards, same_observations = (
        int(np.sum(rewards[0] == rewards[1])),
        int(np.sum(np.all(observations[0] == observations[1], axis=1))),
    )
    print("environment (walker-walk, the same seed and 1000 actions):")
    print(
        f"  return {rewards[0].sum():.12f} against {rewards[1].sum():.12f}; rewards equal to the bit: "
        f"{same_rewards} of 1000; observations holding the same values: {same_observations} of 1001"
    )
    if same_rewards < 1000 or same_observations < 1001:
        failures.append("the environments differ")
    n = len(ours_out["init_stats"])
    print(f"initial networks ({n} initialisations each; mean ± standard error, ours against the release's):")
    for i, name in enumerate(INIT_STATISTICS):
        (m_ours, se_ours), (m_release, se_release) = (
            (s[:, i].mean(), s[:, i].std(ddof=1) / np.sqrt(n))
            for s in (ours_out["init_stats"], release_out["init_stats"])
        )
        z = (m_ours - m_release) / np.hypot(se_ours, se_release)
        print(
            f"  {name:40s} {m_ours:8.4f} ± {se_ours:.4f}  against  {m_release:8.4f} ± {se_release:.4f}  ({z:+.1f} s.e.)"
        )
        if abs(z) > TOLERANCE["init_z"]:
            failures.append(f"initial networks: {name} differs by {z:+.1f} standard errors")
    for loss in LOSSES:
        print(f"one update, categorical loss {loss} (the same parameters, batch and target candidates):")
        for k in ("td_loss", "delta_mle_loss", "categorical_mle_loss"):
            ours_loss, release_loss = float(ours_out[f"{loss}/loss/{k}"]), float(release_out[f"{loss}/loss/{k}"])
            print(f"  {k:22s} {ours_loss:.7f} against {release_loss:.7f}")
            if abs(ours_loss - release_loss) > TOLERANCE["loss"] * abs(release_loss):
                failures.append(f"{loss}: {k} {ours_loss} against {release_loss}")
        same = np.all(np.isclose(ours_out[f"{loss}/refreshed_argmax"], release_out[f"{loss}/refreshed_argmax"]), 1)
        priorities = relative(ours_out[f"{loss}/priorities"], release_out[f"{loss}/priorities"])
        print(
            f"  refreshed arg-max equal for {same.mean():.0%} of the batch; new priorities differ by at most "
            f"{priorities:.1e} of the largest"
        )
        gradients = [k for k in ours_out if k.startswith(f"{loss}/grad/")]
        worst, name = max((relative(ours_out[k], release_out[k]), k.split("/grad/")[1]) for k in gradients)
        print(
            f"  gradients of all {len(gradients)} parameter arrays: each within {worst:.1e} of its largest entry "
            f"(the worst: {name})"
        )
        if not same.all() or priorities > TOLERANCE["priorities"] or worst > TOLERANCE["gradient"]:
            failures.append(
                f"{loss}: the update differs (arg-maxes, priorities {priorities:.1e} or gradients {worst:.1e})"
            )
    return failures


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, as every script here answers bad input
        sys.exit(f"error: {message}")


def main() -> None:
    intro, details = __doc__.split("\n\n", 1)
    parser = Parser(description=intro, epilog=details, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--release-dir", required=True, help="a clone of github.com/atavakol/qmle (its src/ is imported)"
    )
    parser.add_argument(
        "--torch-python",
        default=sys.executable,
        help="a Python with PyTorch and the release's requirements (default: this one)",
    )
    parser.add_argument("--inits", type=int, default=200, help="initialisations of each network for their statistics")
    parser.add_argument("--env-seed", type=int, default=3, help="seed of the environment check")
    parser.add_argument(
        "--release-layernorm-eps",
        type=float,
        default=1e-5,
        help="LayerNorm epsilon on the release's side: PyTorch's 1e-5, as the release has it; "
        "1e-6 (Flax's) isolates every other difference",
    )
    parser.add_argument("--release-side", metavar="NPZ", help=argparse.SUPPRESS)  # the second Python's entry
    args = parser.parse_args()
    if not os.path.isfile(os.path.join(args.release_dir, "src", "model.py")):
        sys.exit(f"error: --release-dir {args.release_dir!r} has no src/model.py; give a clone of atavakol/qmle")
    if args.inits < 2:
        sys.exit(f"error: --inits must be >= 2 (a standard error needs two), got {args.inits}")
    if not (np.isfinite(args.release_layernorm_eps) and args.release_layernorm_eps > 0):
        sys.exit(f"error: --release-layernorm-eps must be a positive number, got {args.release_layernorm_eps}")
    if args.release_side:
        np.savez(
            args.release_side + ".release.npz",
            **release(
                dict(np.load(args.release_side)),
                args.release_dir,
                args.release_layernorm_eps,
                args.inits,
                args.env_seed,
            ),
        )
        return
    try:
        probe = subprocess.run([args.torch_python, "-c", "import numpy, torch"], capture_output=True, text=True)
    except OSError as e:
        sys.exit(f"error: --torch-python {args.torch_python!r} does not run: {e.strerror}")
    if probe.returncode:
        sys.exit(
            f"error: --torch-python {args.torch_python!r} cannot import torch and numpy: "
            f"{(probe.stderr.strip().splitlines() or ['?'])[-1]}"
        )
    commit = (
        subprocess.run(
            ["git", "-C", args.release_dir, "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        or "not a git checkout"
    )
    print(
        f"the release: {os.path.abspath(args.release_dir)} ({commit}); its LayerNorm epsilon "
        f"{args.release_layernorm_eps:g}",
        flush=True,
    )
    data = shared_inputs(np.random.default_rng(0))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "shared.npz")
        ours_out = ours(data, args.inits, args.env_seed)
        np.savez(path, **data, **{k: v for k, v in ours_out.items() if k.startswith(("online/", "target/"))})
        child = subprocess.run(
            [
                args.torch_python,
                os.path.abspath(__file__),
                "--release-side",
                path,
                "--release-dir",
                args.release_dir,
                "--inits",
                str(args.inits),
                "--env-seed",
                str(args.env_seed),
                "--release-layernorm-eps",
                repr(args.release_layernorm_eps),
            ]
        )
        if child.returncode:
            sys.exit(f"error: the release's side failed (exit {child.returncode}); its output is above")
        release_out = dict(np.load(path + ".release.npz"))
    failures = compare(ours_out, release_out)
    if failures:
        sys.exit("\n".join(f"differs: {f}" for f in failures))
    print("the same, within every tolerance", TOLERANCE)


if __name__ == "__main__":
    main()
