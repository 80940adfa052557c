"""Does qmle_dmc.py compute what the authors' release computes? Three checks, each on inputs both programs share:

- the environment: the same seed and the same 1000 actions through both programs' DeepMind Control wrappers;
- the initial network: Q values, the greedy action over 1000 uniform candidates and the predictors' outputs on
  the same inputs, averaged over many initialisations of each (their init draws differ, their statistics should not);
- one update: the release's network given qmle_dmc.py's parameters (online and target), the same batch and the same
  target candidates; the losses, the refreshed arg-maxes, the new priorities and every parameter's gradient.

The release's side runs in a Python with PyTorch and the release's requirements (not this project's), importing its
network and environment from a clone of https://github.com/atavakol/qmle:

    python benchmarks/release_update.py --release-dir ../qmle --torch-python ../qmle-venv/bin/python

Gradients are compared, not Adam steps: Adam's first step is lr * sign(gradient), blind to a gradient's scale. Both
sides use LayerNorm epsilon 1e-6 (Flax's) unless --release-layernorm-eps 1e-5 (PyTorch's) is given.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import types

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
OBS_DIM, ACTION_DIM, BATCH, TARGET_CANDIDATES, GREEDY_CANDIDATES = 24, 6, 256, 100, 1000  # walker-walk's sizes


def shared_inputs(rng: np.random.Generator) -> dict:
    f32 = lambda x: np.asarray(x, np.float32)  # noqa: E731
    return {"b/obs": f32(rng.normal(size=(BATCH, OBS_DIM))), "b/action": f32(rng.uniform(-1, 1, (BATCH, ACTION_DIM))),
            "b/reward": f32(rng.uniform(0, 1, BATCH)), "b/next_obs": f32(rng.normal(size=(BATCH, OBS_DIM))),
            "b/terminated": np.zeros(BATCH, np.float32), "b/argmax": f32(rng.uniform(-1, 1, (BATCH, ACTION_DIM))),
            "weights": f32(rng.uniform(0.3, 1.0, BATCH)),  # importance weights as the replay would give them
            # the target's candidates: continuous and grid samples (a predictor's sample is one more action)
            "cands": f32(np.concatenate([rng.uniform(-1, 1, (BATCH, 45, ACTION_DIM)),
                                         rng.choice([-1.0, 0.0, 1.0], (BATCH, TARGET_CANDIDATES - 45, ACTION_DIM))], 1)),
            "init_obs": f32(rng.normal(size=(64, OBS_DIM))),
            "init_cands": f32(rng.uniform(-1, 1, (64, GREEDY_CANDIDATES, ACTION_DIM))),
            "env_actions": f32(rng.uniform(-1, 1, (1000, ACTION_DIM)))}


def init_statistics(q_values: np.ndarray, cands: np.ndarray, delta: np.ndarray, logits: np.ndarray) -> list:
    best = cands[np.arange(len(cands)), q_values.argmax(1)]
    return [q_values.mean(), q_values.std(1).mean(), q_values.mean(1).std(), np.abs(best).mean(),
            np.abs(delta).mean(), logits.std()]


INIT_STATISTICS = ("mean Q", "spread of Q over a state's candidates", "spread of mean Q over states",
                   "mean |greedy action|", "mean |delta prediction|", "spread of categorical logits")


def ours(data: dict, inits: int, env_seed: int) -> dict:
    """qmle_dmc.py's side: its gradient_step with sampling replaced by the shared batch and candidates."""
    import flax
    import jax
    import jax.numpy as jnp
    import optax

    sys.path.insert(0, ROOT)
    import qmle_dmc as q

    model = q.QMLENetwork(ACTION_DIM, 3)

    @jax.jit
    def init(seed):
        key = jax.random.PRNGKey(seed)
        params = model.init(key, jnp.zeros((1, OBS_DIM)), jnp.zeros((1, 1, ACTION_DIM)))
        return q.release_init(params, jax.random.fold_in(key, 1), "uniform", "whole")  # the defaults' init

    params, target_params = init(1), init(2)
    batch = {k[2:]: jnp.asarray(v) for k, v in data.items() if k.startswith("b/")}
    q.sample_candidates = lambda *args, **kwargs: jnp.asarray(data["cands"])
    q.buffer_sample = lambda *args, **kwargs: (jnp.arange(BATCH), batch, jnp.asarray(data["weights"]))
    state = q.QMLEState.create(apply_fn=None, params=params, tx=optax.sgd(1.0), target_params=target_params)
    buffer = q.buffer_init(jax.tree.map(lambda x: x[0], batch), BATCH)
    stepped, buffer, metrics = q.gradient_step(
        model, state, buffer, jax.random.PRNGKey(0), gamma=0.99, batch_size=BATCH, budget=q.Budget(45, 55, 0, 0),
        noise_std=0.1, prioritized=True, alpha=0.6, beta=0.2, priority_epsilon=1e-6, categorical_loss="softmax-twice",
        predictor_target="cached", importance_normalisation="batch")  # the weights above, as they are
    flat = lambda p: {"/".join(k): np.asarray(v) for k, v in flax.traverse_util.flatten_dict(p["params"]).items()}  # noqa
    leaves = buffer.tree.shape[0] // 2
    out = {**{"p0/" + k: v for k, v in flat(params).items()}, **{"t0/" + k: v for k, v in flat(target_params).items()},
           **{"grad/" + k: flat(params)[k] - v for k, v in flat(stepped.params).items()},
           "priorities": np.asarray(buffer.tree[leaves:leaves + BATCH]) ** (1 / 0.6),
           "new_argmax": np.asarray(buffer.storage["argmax"]),
           **{"loss/" + k.split("/")[1]: np.asarray(v) for k, v in metrics.items() if k.startswith("losses/")}}
    @jax.jit
    def outputs(params):
        embedding = model.apply(params, data["init_obs"], method=q.QMLENetwork.observation_stream)
        return (model.apply(params, embedding, data["init_cands"], method=q.QMLENetwork.q_values),
                model.apply(params, embedding, method=q.QMLENetwork.delta),
                model.apply(params, embedding, method=q.QMLENetwork.categorical_logits))

    stats = []
    for seed in range(inits):
        q_values, delta, logits = (np.asarray(x) for x in outputs(init(1000 + seed)))
        stats.append(init_statistics(q_values, data["init_cands"], delta, logits))
    out["init_stats"] = np.array(stats)
    env = q.make_env("walker-walk", env_seed)
    env.reset(seed=env_seed)
    out["env_rewards"] = np.array([env.step(a)[1] for a in data["env_actions"]])
    return out


def release(data: dict, release_dir: str, layernorm_eps: float, inits: int, env_seed: int) -> dict:
    """The release's side, in a Python with PyTorch: its network modules, its loss as its training step forms it."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(1)  # small matrices: threads only contend
    sys.path.insert(0, release_dir)
    from src.gym_dmc_env import make_gym_dmc_env
    from src.model import QMLENetwork

    box = lambda shape: types.SimpleNamespace(shape=shape, low=-np.ones(shape, np.float32),  # noqa: E731
                                              high=np.ones(shape, np.float32))
    env = types.SimpleNamespace(single_action_space=box((ACTION_DIM,)), single_observation_space=box((OBS_DIM,)))
    t = lambda x: torch.from_numpy(np.asarray(x))  # noqa: E731

    def network(prefix=None):
        """The release's QMLENetwork, holding our parameters under `prefix` (our Dense kernels are its weights
        transposed; our split joint layer is its one Linear on the concatenation; our one categorical head is its
        per-dimension heads side by side)."""
        net = QMLENetwork(env, num_categories=3)
        for module in net.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.eps = layernorm_eps
        if prefix is None:
            return net
        p = lambda name: t(data[prefix + name])  # noqa: E731

        def linear(module, name, kernel=None, bias=None):
            module.weight.data.copy_((p(name + "/kernel") if kernel is None else kernel).T)
            module.bias.data.copy_(p(name + "/bias") if bias is None else bias)

        def norm(module, name):
            module.weight.data.copy_(p(name + "/scale"))
            module.bias.data.copy_(p(name + "/bias"))

        linear(net.obs_encoder[0], "obs_embed")
        linear(net.obs_encoder[1].layer[0], "obs_block/Dense_0")
        linear(net.obs_encoder[1].layer[2], "obs_block/Dense_1")
        norm(net.obs_encoder[1].layer_norm, "obs_norm")
        linear(net.act_encoder[0], "act_embed")
        norm(net.act_encoder[1], "act_norm")
        joint = net._obs_act_encoder
        linear(joint[0].layer[0], "joint_in_obs", kernel=torch.cat([p("joint_in_obs/kernel"), p("joint_in_act/kernel")]))
        linear(joint[0].layer[2], "joint_out")
        norm(joint[0].layer_norm, "joint_norm")
        linear(joint[2], "q_head")
        linear(net.delta_predictor[0], "delta_hidden")
        linear(net.delta_predictor[2], "delta_head")
        linear(net.categorical_torso[0], "categorical_hidden")
        for d, head in enumerate(net.categorical_predictor):
            linear(head[0], "categorical_head", kernel=p("categorical_head/kernel")[:, 3 * d:3 * d + 3],
                   bias=p("categorical_head/bias")[3 * d:3 * d + 3])
        return net

    def q_of_candidates(net, obs, candidates):  # the tail of the release's forward, candidates given
        latent = net.obs_encoder(obs).unsqueeze(1).expand(-1, candidates.shape[1], -1)
        return net._obs_act_encoder(torch.cat([latent, net.act_encoder(candidates)], -1)).squeeze(-1)

    online, target = network("p0/"), network("t0/")
    b = {k[2:]: t(v) for k, v in data.items() if k.startswith("b/")}
    with torch.no_grad():
        candidates = torch.cat([t(data["cands"]), b["argmax"][:, None]], 1)  # the cached arg-max comes last
        next_q = q_of_candidates(target, b["next_obs"], candidates)
        td_target = b["reward"] + 0.99 * (1 - b["terminated"]) * next_q.max(1).values
        new_argmax = candidates[torch.arange(BATCH), next_q.argmax(1)]
    q_taken = online(b["obs"], act=b["action"]).squeeze(-1)
    td_loss = (t(data["weights"]) * (q_taken - td_target) ** 2).mean()
    bins = online.map_continuous_to_bins(b["argmax"])  # the predictors learn toward the cached arg-max
    probabilities = online.get_categorical_predictor_outputs(b["next_obs"])  # its heads end in a softmax
    categorical_loss = torch.stack([F.cross_entropy(p, bins[:, d]) for d, p in enumerate(probabilities)]).mean()
    delta_loss = ((online.get_delta_predictor_outputs(b["next_obs"]) - b["argmax"]) ** 2).mean()
    (td_loss + categorical_loss + delta_loss).backward()
    # The gradients, laid out as our parameters: load them into a second network and read them back.
    grads = network()
    for mine, theirs in zip(grads.parameters(), online.parameters()):
        mine.data.copy_(theirs.grad)
    out = {"loss/td_loss": td_loss.item(), "loss/delta_mle_loss": delta_loss.item(),
           "loss/categorical_mle_loss": categorical_loss.item(),
           "priorities": (q_taken - td_target).abs().detach().numpy() + 1e-6, "new_argmax": new_argmax.numpy()}
    out.update({"grad/" + k: v for k, v in as_our_layout(grads).items()})
    stats = []
    with torch.no_grad():
        for seed in range(inits):
            torch.manual_seed(1000 + seed)
            net = network()
            obs, cands = t(data["init_obs"]), t(data["init_cands"])
            latent = net.obs_encoder(obs)
            logits = torch.stack([head[0](net.categorical_torso(latent)) for head in net.categorical_predictor], 1)
            stats.append(init_statistics(q_of_candidates(net, obs, cands).numpy(), data["init_cands"],
                                         net.delta_predictor(latent).numpy(), logits.numpy()))
    out["init_stats"] = np.array(stats)
    dmc = make_gym_dmc_env("walker_walk", seed=env_seed)
    dmc.reset()
    out["env_rewards"] = np.array([dmc.step(a)[1] for a in data["env_actions"]])
    return out


def as_our_layout(net) -> dict:
    """The release's parameters (here: gradients) under our names and shapes; the inverse of network()'s loading."""
    w = lambda m: m.weight.detach().numpy().T  # noqa: E731
    bias = lambda m: m.bias.detach().numpy()  # noqa: E731
    out = {}
    for name, m in [("obs_embed", net.obs_encoder[0]), ("obs_block/Dense_0", net.obs_encoder[1].layer[0]),
                    ("obs_block/Dense_1", net.obs_encoder[1].layer[2]), ("act_embed", net.act_encoder[0]),
                    ("joint_out", net._obs_act_encoder[0].layer[2]), ("q_head", net._obs_act_encoder[2]),
                    ("delta_hidden", net.delta_predictor[0]), ("delta_head", net.delta_predictor[2]),
                    ("categorical_hidden", net.categorical_torso[0])]:
        out[name + "/kernel"], out[name + "/bias"] = w(m), bias(m)
    for name, m in [("obs_norm", net.obs_encoder[1].layer_norm), ("act_norm", net.act_encoder[1]),
                    ("joint_norm", net._obs_act_encoder[0].layer_norm)]:
        out[name + "/scale"], out[name + "/bias"] = m.weight.detach().numpy(), bias(m)
    joint = net._obs_act_encoder[0].layer[0]
    out["joint_in_obs/kernel"], out["joint_in_act/kernel"] = np.split(w(joint), 2)
    out["joint_in_obs/bias"] = bias(joint)
    heads = [h[0] for h in net.categorical_predictor]
    out["categorical_head/kernel"] = np.concatenate([w(h) for h in heads], 1)
    out["categorical_head/bias"] = np.concatenate([bias(h) for h in heads])
    return out


def report(a: dict, r: dict) -> None:
    rel = lambda x, y: float(np.max(np.abs(x - y)) / max(np.max(np.abs(y)), 1e-30))  # noqa: E731
    print("environment (walker-walk, the same seed and 1000 actions):")
    print(f"  return {a['env_rewards'].sum():.12f} against the release's {r['env_rewards'].sum():.12f}; "
          f"{int(np.sum(a['env_rewards'] == r['env_rewards']))} of 1000 rewards equal to the bit")
    n = len(a["init_stats"])
    print(f"initial networks ({n} initialisations each, mean ± standard error; ours against the release's):")
    for i, name in enumerate(INIT_STATISTICS):
        (ma, sa), (mr, sr) = ((s[:, i].mean(), s[:, i].std(ddof=1) / np.sqrt(n)) for s in (a["init_stats"], r["init_stats"]))
        print(f"  {name:40s} {ma:8.4f} ± {sa:.4f}  against  {mr:8.4f} ± {sr:.4f}")
    print("one update (the same parameters, batch and target candidates):")
    for k in ("td_loss", "delta_mle_loss", "categorical_mle_loss"):
        print(f"  {k:22s} {float(a['loss/' + k]):.7f} against {float(r['loss/' + k]):.7f}")
    same = np.all(np.isclose(a["new_argmax"], r["new_argmax"]), 1).mean()
    print(f"  refreshed arg-max equal for {same:.0%} of the batch; new priorities: largest relative difference "
          f"{rel(a['priorities'], r['priorities']):.1e}")
    worst = max((rel(a[k], r[k]), k[5:]) for k in a if k.startswith("grad/"))
    print(f"  gradients of all {sum(k.startswith('grad/') for k in a)} parameter arrays: largest relative difference "
          f"{worst[0]:.1e} ({worst[1]})")


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, as every script here answers bad input
        sys.exit(f"error: {message}")


def main() -> None:
    parser = Parser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--release-dir", required=True, help="a clone of github.com/atavakol/qmle (its src/ is imported)")
    parser.add_argument("--torch-python", default=sys.executable,
                        help="a Python with PyTorch and the release's requirements (default: this one)")
    parser.add_argument("--inits", type=int, default=200, help="initialisations of each network for their statistics")
    parser.add_argument("--env-seed", type=int, default=3, help="seed of the environment check")
    parser.add_argument("--release-layernorm-eps", type=float, default=1e-6,
                        help="LayerNorm epsilon on the release's side (1e-6 is Flax's, 1e-5 PyTorch's and the release's)")
    parser.add_argument("--release-side", metavar="NPZ", help=argparse.SUPPRESS)  # the child process's entry
    args = parser.parse_args()
    if not os.path.isfile(os.path.join(args.release_dir, "src", "model.py")):
        sys.exit(f"error: --release-dir {args.release_dir!r} has no src/model.py; give a clone of atavakol/qmle")
    if args.inits < 2:
        sys.exit(f"error: --inits must be >= 2 (a standard error needs two), got {args.inits}")
    if not (np.isfinite(args.release_layernorm_eps) and args.release_layernorm_eps > 0):
        sys.exit(f"error: --release-layernorm-eps must be a positive number, got {args.release_layernorm_eps}")
    if args.release_side:
        data = dict(np.load(args.release_side))
        np.savez(args.release_side + ".release.npz",
                 **release(data, args.release_dir, args.release_layernorm_eps, args.inits, args.env_seed))
        return
    data = shared_inputs(np.random.default_rng(0))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "shared.npz")
        mine = ours(data, args.inits, args.env_seed)
        np.savez(path, **data, **{k: v for k, v in mine.items() if k[:3] in ("p0/", "t0/")})
        subprocess.run([args.torch_python, os.path.abspath(__file__), "--release-side", path, "--release-dir",
                        args.release_dir, "--inits", str(args.inits), "--env-seed", str(args.env_seed),
                        "--release-layernorm-eps", str(args.release_layernorm_eps)], check=True)
        theirs = dict(np.load(path + ".release.npz"))
    report(mine, theirs)


if __name__ == "__main__":
    main()
