"""What a checkpoint of qmle_dmc.py costs: its size on disk and the time to write and to read it back.

A checkpoint is the whole run state (online and target parameters, Adam's moments, the replay buffer with its
sum-tree, the keys and counters, the environment itself), written by the script's own save_arrays as one
uncompressed .npz. Almost all of it is the replay storage: per transition the observation and next observation,
the action and the cached arg-max, the reward and the termination flag, in float32. This fills a buffer with
random transitions of the task's shapes, writes the checkpoint as a run does, reads it back as --resume does, and
checks that every array came back as it was written.

    python benchmarks/checkpoint.py                                   # dog-walk, 1M transitions (about 2.1 GB)
    python benchmarks/checkpoint.py --env-id walker-walk --transitions 100000
"""

import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tyro

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import qmle_dmc as qmle  # noqa: E402


@dataclass
class Args:
    env_id: str = "dog-walk"
    """task whose observation and action shapes the transitions have"""
    transitions: int = 1_000_000
    """transitions in the replay buffer (the buffer is full: its capacity is this too)"""
    directory: Optional[str] = None
    """where the checkpoint is written (default: a temporary directory, removed afterwards)"""
    output: Optional[str] = None
    """also write the results as JSON here"""


def fail(message: str) -> None:
    raise SystemExit(f"error: {message}")


def run_state(env_id: str, transitions: int, seed: int = 0) -> dict:
    """The state qmle_dmc.py checkpoints, as its main() builds it, with a full buffer of random transitions."""
    envs = qmle.make_envs(env_id, seed, 1)
    obs_dim, action_dim = envs.single_observation_space.shape[0], envs.single_action_space.shape[0]
    saved_envs = qmle.saved_envs(envs, envs.reset(seed=seed)[0])  # the environment, simulator and all
    envs.close()
    d = qmle.Args(env_id=env_id)
    model = qmle.QMLENetwork(action_dim, d.num_bins)
    key = jax.random.PRNGKey(seed)
    params = jax.jit(model.init)(key, jnp.zeros((1, obs_dim)), jnp.zeros((1, 1, action_dim)))
    state = qmle.QMLEState.create(
        apply_fn=model.apply, params=params, target_params=params, tx=optax.adam(d.learning_rate)
    )
    keys = jax.random.split(key, 4)
    rows = dict(
        obs=jax.random.normal(keys[0], (transitions, obs_dim)),
        action=jax.random.uniform(keys[1], (transitions, action_dim), minval=-1, maxval=1),
        reward=jax.random.uniform(keys[2], (transitions,)),
        next_obs=jax.random.normal(keys[3], (transitions, obs_dim)),
        terminated=jnp.zeros(transitions),
        argmax=jax.random.uniform(keys[1], (transitions, action_dim)),
    )
    buffer = qmle.buffer_add(qmle.buffer_init(jax.tree.map(lambda x: x[0], rows), transitions), rows)
    pending = {k: np.zeros((d.train_frequency, *v.shape[1:]), np.float32) for k, v in rows.items()}
    return dict(
        state=jax.tree.map(jnp.asarray, state),
        buffer=buffer,
        key=key,
        wins=jnp.zeros(len(qmle.SOURCES)),
        pending=pending,
        envs=saved_envs,
    )


def measure(args: Args) -> dict:
    run = run_state(args.env_id, args.transitions)
    jax.block_until_ready(run)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(args.directory or tmp, "checkpoint.npz")
        start = time.perf_counter()
        qmle.save_arrays(
            path, run, dict(args=vars(qmle.Args(env_id=args.env_id)), global_step=args.transitions, wandb_id=None)
        )
        write_s = time.perf_counter() - start
        size = os.path.getsize(path)
        start = time.perf_counter()
        _, _, arrays = qmle.saved_settings(qmle.Args(resume=args.directory or tmp))  # as --resume reads it
        restored = jax.block_until_ready(qmle.restore(run, arrays, "--resume"))
        read_s = time.perf_counter() - start
    same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(run), jax.tree.leaves(restored)))
    if not same:
        fail("the checkpoint read back differs from what was written")
    storage = sum(np.asarray(x).nbytes for x in jax.tree.leaves(run["buffer"].storage))
    return dict(
        env_id=args.env_id,
        transitions=args.transitions,
        bytes=size,
        replay_storage_bytes=storage,
        bytes_per_transition=storage / args.transitions,
        environment_bytes=run["envs"]["envs"].nbytes,
        write_s=write_s,
        read_s=read_s,
        write_mb_per_s=size / 1e6 / write_s,
        read_mb_per_s=size / 1e6 / read_s,
    )


def main(args: Args) -> None:
    if args.transitions < 1:
        fail(f"--transitions must be >= 1, got {args.transitions}")
    if args.directory is not None and not os.path.isdir(args.directory):
        fail(f"--directory: no such directory: {args.directory}")
    qmle.make_env(args.env_id, 0).close()  # an unknown id fails here with its one line
    r = measure(args)
    print(
        f"| task | transitions | checkpoint | of it replay storage | environment | per transition | write | read |\n"
        f"|---|---|---|---|---|---|---|---|\n"
        f"| {r['env_id']} | {r['transitions']:,} | {r['bytes'] / 1e9:.2f} GB "
        f"| {r['replay_storage_bytes'] / 1e9:.2f} GB | {r['environment_bytes'] / 1e6:.0f} MB "
        f"| {r['bytes_per_transition']:,.0f} B | {r['write_s']:.1f} s ({r['write_mb_per_s']:.0f} MB/s) "
        f"| {r['read_s']:.1f} s ({r['read_mb_per_s']:.0f} MB/s) |"
    )
    if args.output:
        with open(args.output, "w") as f:
            json.dump(r, f, indent=1)


if __name__ == "__main__":
    main(tyro.cli(Args))
