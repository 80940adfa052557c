import contextlib
import csv
import gc
import glob
import json
import os
import signal
import subprocess
import sys
import tempfile

# The suite compiles hundreds of small XLA programs, and at these sizes compiling is most of the suite's time: LLVM's
# optimisation passes, and the CPU backend's MLIR fusion emitters (the older emitters compile the same fusions about
# a third faster). Without them the same programs run, a little slower, to results equal up to float rounding (not
# bit for bit: LLVM reorders some sums). The scripts the tests start as subprocesses inherit the setting.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()
# The agents' persistent compilation cache, shared by the suite's processes and kept out of the user's ~/.cache.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "qmle-jax-tests-xla"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")  # without LLVM's passes most take < 1 s
# The bandit illustration runs long loops of few programs: for it XLA's usual optimisation pays, in its own process.
OPTIMISED = dict(os.environ, XLA_FLAGS=os.environ["XLA_FLAGS"].replace("--xla_backend_optimization_level=0", ""))

import jax  # noqa: E402 (after XLA_FLAGS, which XLA reads once)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("MPLBACKEND", "Agg")


def run_script(script, *flags, cwd=None, env=None, timeout=600):
    """Run one of the project's scripts as a user would, capturing what it prints."""
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, script), *flags],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def command_line(**settings):
    """An agent's settings as the command-line flags that give them: num_envs=3 -> --num-envs 3."""
    return [word for name, value in settings.items() for word in (f"--{name.replace('_', '-')}", str(value))]


def interrupt(script, flags, cwd, env=None, after="step      300", signum=signal.SIGINT, group=False):
    """Start a script as a user would, press Ctrl-C (SIGINT) once it prints a line starting with `after` (it is
    training, past compiling), or send `signum` to its whole process group, and return the finished process's
    (return code, stdout, stderr)."""
    process = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, script), *flags],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=group,
    )
    for line in process.stdout:
        if line.startswith(after):
            break
    if group:
        os.killpg(process.pid, signum)
    else:
        process.send_signal(signum)
    try:
        stdout, stderr = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:  # it did not stop: neither it nor its workers outlive the test
        if group:
            os.killpg(process.pid, signal.SIGKILL)
        process.kill()
        raise
    return process.returncode, stdout, stderr


def refusal(main, *args) -> str:
    """The one `error:` line that main(*args) stops with, as `python script.py ...` prints it to stderr (Python's own
    handling of a SystemExit with a string) with exit status 1; the command-line path itself is tested once, in
    test_inputs.py."""
    with pytest.raises(SystemExit) as exit_info:
        main(*args)
    text = str(exit_info.value)
    assert text.startswith("error: ") and "\n" not in text, text
    return text


def load_saved(path):
    """(meta, {name: array}) of a model or checkpoint an agent saved: an .npz with a JSON header under __meta__."""
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    return json.loads(str(arrays.pop("__meta__"))), arrays


def run_in_process(agent, directory, monkeypatch, **settings):
    """Run an agent's main() here (a warm jit cache makes repeated runs cheap); return the run directory and its
    checkpoint (meta, arrays)."""
    monkeypatch.chdir(directory)
    args = agent.Args(**settings)
    agent.main(args)
    run_dir = args.resume or max(glob.glob(f"runs/*__{args.exp_name}__*"), key=os.path.getmtime)
    return run_dir, load_saved(os.path.join(run_dir, "checkpoint.npz"))


def read_metrics(run_dir):
    return list(csv.DictReader(open(os.path.join(run_dir, "metrics.csv"))))


def resumes_as_if_it_never_stopped(agent, directory, monkeypatch, **settings):
    """A run to step 500 that never stopped, and the same run stopped at 250, in the middle of an episode
    (Pendulum-v1's last 200 steps), and resumed from its checkpoint, write the same metrics.csv (steps/s aside)."""
    monkeypatch.chdir(directory)
    settings = dict(settings, total_timesteps=500, checkpoint_frequency=1000, eval_frequency=0)  # no final evaluations
    agent.main(agent.Args(**dict(settings, exp_name="straight")))
    agent.main(agent.Args(**dict(settings, exp_name="stopped", total_timesteps=250)))
    (stopped,) = glob.glob("runs/*__stopped__*")
    agent.main(agent.Args(resume=stopped, total_timesteps=500))
    straight, resumed = (
        [{k: v for k, v in r.items() if k != "charts/SPS"} for r in read_metrics(glob.glob(f"runs/*__{name}__*")[0])]
        for name in ("straight", "stopped")
    )
    ends = [int(r["global_step"]) for r in straight if r["charts/episodic_return"]]
    assert ends and 250 < ends[-1] < 500  # an episode the stop cut through ended, and the next one began
    assert resumed == straight


@contextlib.contextmanager
def counting_compiles():
    """Inside the block, the list it yields gets one entry per program XLA compiles (jax's own compile events)."""
    compiled = []

    def listener(event, seconds, **_):
        if event == "/jax/core/compile/backend_compile_duration":
            compiled.append(seconds)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield compiled
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def saved(arrays, prefix):
    """The arrays of a saved pytree under one path prefix, keyed by the rest of their path."""
    return {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}


@jax.jit
def q_reference(params, obs, actions):
    """Appendix B.1's Q(s, a) for one state and [M, D] actions, written out from the raw parameters with the
    concatenation the paper draws (no split layer, no chunking): the independent reference for both agents."""
    p = params["params"]
    relu, elu = jax.nn.relu, jax.nn.elu
    dense = lambda name, x: x @ p[name]["kernel"] + p[name].get("bias", 0.0)

    def norm(name, x):
        mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mean) / jnp.sqrt(var + 1e-6) * p[name]["scale"] + p[name]["bias"]

    def block(name, x):
        h = x @ p[name]["Dense_0"]["kernel"] + p[name]["Dense_0"]["bias"]
        return x + relu(h) @ p[name]["Dense_1"]["kernel"] + p[name]["Dense_1"]["bias"]

    o = elu(norm("obs_norm", block("obs_block", dense("obs_embed", obs))))
    a = elu(norm("act_norm", dense("act_embed", actions)))
    x = jnp.concatenate([jnp.broadcast_to(o, a.shape), a], -1)
    w_in = jnp.concatenate([p["joint_in_obs"]["kernel"], p["joint_in_act"]["kernel"]], 0)
    h = relu(x @ w_in + p["joint_in_obs"]["bias"]) @ p["joint_out"]["kernel"] + p["joint_out"]["bias"]
    return dense("q_head", elu(norm("joint_norm", x + h)))[..., 0]


@pytest.fixture(autouse=True, scope="module")
def compiled_code_is_freed_after_each_module():
    """Every executable XLA compiles on a CPU holds memory maps of its machine code, and jax keeps them all.
    The whole suite compiles enough of them to pass the kernel's limit of 65,530 maps per process, and the
    next compilation then dies with a segmentation fault; each module frees what it compiled."""
    yield
    jax.clear_caches()
    gc.collect()


@pytest.fixture(autouse=True)
def default_signal_handlers_after_each_test():
    """An agent's main() takes over SIGINT and SIGTERM from its first line; one that stops at an input error
    leaves them so. Give pytest its Ctrl-C back."""
    yield
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
