"""What every script shares: values tyro accepts but a run cannot use stop with one `error:` line before anything
starts; tyro's own refusals stay tyro's (its message, status 2, no traceback); and the README names only paths that
exist in a clone."""

import dataclasses
import os
import re
import signal
import stat
import subprocess
import sys

import gymnasium as gym
import jax.numpy as jnp
import numpy as np
import pytest
import tyro
from conftest import ROOT, refusal, run_script

import aql_discrete
import bandit_illustration
import climbing_game
import dqn_grid
import qmle_dmc
import qtopt_cem
import wolpertinger

SCRIPTS = {
    "qmle_dmc.py": qmle_dmc,
    "qtopt_cem.py": qtopt_cem,
    "aql_discrete.py": aql_discrete,
    "wolpertinger.py": wolpertinger,
    "dqn_grid.py": dqn_grid,
    "bandit_illustration.py": bandit_illustration,
    "climbing_game.py": climbing_game,
}
AGENT_SCRIPTS = ["qmle_dmc.py", "qtopt_cem.py", "aql_discrete.py", "wolpertinger.py", "dqn_grid.py"]
FLOAT_FLAGS = [
    (script, field.name)
    for script, module in SCRIPTS.items()
    for field in dataclasses.fields(module.Args)
    if field.type in (float, "float")
]
NO_RENDERER = dict(os.environ, MUJOCO_GL="disable")


def one_error_line(result, flag):
    """The script stopped with status 1 and one line on stderr: `error: ...` naming the flag."""
    lines = result.stderr.strip().splitlines()
    return result.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: ") and flag in lines[0]


def test_every_script_has_float_flags_to_check():
    # the table below is built from the dataclasses: make sure it found them (a renamed type would empty it)
    assert {script for script, _ in FLOAT_FLAGS} == set(SCRIPTS)
    assert ("qmle_dmc.py", "delta_noise_std") in FLOAT_FLAGS and ("qmle_dmc.py", "importance_exponent") in FLOAT_FLAGS


@pytest.mark.parametrize("script, name", FLOAT_FLAGS)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_every_float_flag_refuses_nan_and_infinity(script, name, value):
    module = SCRIPTS[script]
    with pytest.raises(SystemExit) as exit_info:
        module.check_args(module.Args(**{name: value}))
    assert str(exit_info.value).startswith(f"error: --{name.replace('_', '-')} ")


@pytest.mark.parametrize(
    "script, flag",
    [("qmle_dmc.py", "--delta-noise-std"), ("wolpertinger.py", "--tau"), ("climbing_game.py", "--local-std")],
)
def test_nan_as_the_command_line_parses_it_is_refused_before_anything_starts(tmp_path, monkeypatch, script, flag):
    monkeypatch.chdir(tmp_path)  # how a refusal reaches the command line: test_a_refusal_from_the_command_line_...
    module = SCRIPTS[script]
    assert flag in refusal(module.main, tyro.cli(module.Args, args=[flag, "nan"]))
    assert not os.listdir(tmp_path)  # refused before anything was started


@pytest.mark.parametrize(
    "script, flags", [("qmle_dmc.py", ["--seed", "1.5"]), ("climbing_game.py", ["--seeed", "1"])]
)  # not a whole number; no such flag
def test_tyros_own_refusals_are_its_usage_errors_without_a_traceback(tmp_path, script, flags):
    result = run_script(script, *flags, cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr and "--seed" in result.stderr
    assert not os.path.exists(tmp_path / "runs")


@pytest.mark.parametrize("script", ["qmle_dmc.py", "bandit_illustration.py"])
def test_help_piped_into_a_reader_that_has_gone_ends_without_a_traceback(tmp_path, script):
    # `--help | head -1` breaks the pipe in most tries, not all (head may exit after the whole help is written);
    # `true` is gone before Python has started, so that the help always meets a closed pipe
    result = subprocess.run(
        f"set -o pipefail; {sys.executable} {os.path.join(ROOT, script)} --help | true",
        shell=True,
        executable="/bin/bash",
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 128 + signal.SIGPIPE and result.stderr == "", result.stderr[-2000:]


def needs_a_missing_package(**kwargs):
    raise ImportError("needs a package this machine lacks\nsecond line of the message")


@pytest.mark.parametrize("script", AGENT_SCRIPTS)
def test_a_registered_env_id_that_cannot_be_made_is_one_line(script):
    # as LunarLander-v3 without Box2D, or HalfCheetah-v2 (moved to gymnasium-robotics): in the registry, not buildable
    gym.register("BrokenForTest-v0", entry_point=needs_a_missing_package)
    try:
        with pytest.raises(SystemExit) as exit_info:
            SCRIPTS[script].make_env("BrokenForTest-v0", 0)
    finally:
        del gym.registry["BrokenForTest-v0"]
    text = str(exit_info.value)
    assert text.startswith("error: --env-id 'BrokenForTest-v0'") and "ImportError" in text and "\n" not in text


@pytest.mark.parametrize("script", ["qmle_dmc.py", "wolpertinger.py"])
def test_capture_video_without_a_renderer_is_one_line_before_anything_starts(tmp_path, script):
    # a GPU machine without libEGL: the renderer cannot start, which used to surface at the first evaluation
    short = ["--total-timesteps", "200", "--learning-starts", "100", "--eval-frequency", "100"]
    result = run_script(
        script, "--env-id", "cartpole-swingup", "--capture-video", *short, cwd=tmp_path, env=NO_RENDERER
    )
    assert one_error_line(result, "render"), result.stderr[-2000:]
    assert not os.path.exists(tmp_path / "runs")


@pytest.mark.parametrize("script", ["qmle_dmc.py", "dqn_grid.py"])
def test_a_renderer_that_cannot_load_is_one_line_at_import(tmp_path, script):
    # dm_control loads MUJOCO_GL's renderer when shimmy imports it, so even --help died in a traceback
    result = run_script(script, "--help", cwd=tmp_path, env=dict(os.environ, MUJOCO_GL="nonsense"))
    assert one_error_line(result, "MUJOCO_GL=nonsense"), result.stderr[-2000:]


@pytest.mark.parametrize("script", ["qmle_dmc.py", "aql_discrete.py"])
def test_without_libegl_the_scripts_import_without_a_renderer_and_step(tmp_path, script):
    # a machine where the EGL library cannot be found, with MUJOCO_GL unset: no renderer is asked for
    env = {k: v for k, v in os.environ.items() if k != "MUJOCO_GL"}
    code = (
        f"import ctypes.util, os, sys; ctypes.util.find_library = lambda name: None; sys.path.insert(0, {ROOT!r}); "
        f"import {script[:-3]} as agent; print(os.environ['MUJOCO_GL']); env = agent.make_env('walker-walk', 0); "
        "env.reset(seed=0); print(env.step(env.action_space.sample())[0].shape)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["disable", "(24,)"]


@pytest.mark.parametrize("script", AGENT_SCRIPTS)
def test_a_namespaced_env_id_makes_one_run_folder(tmp_path, monkeypatch, script):
    # dm_control/walker-walk-v0 nested runs/dm_control/..., where learning.py's report does not look
    monkeypatch.chdir(tmp_path)
    module = SCRIPTS[script]
    run_dir = module.new_run_dir(module.Args(env_id="dm_control/walker-walk-v0", exp_name="x", seed=3))
    assert os.path.dirname(run_dir) == "runs" and os.listdir(tmp_path / "runs") == [os.path.basename(run_dir)]
    assert os.path.basename(run_dir).startswith("dm_control-walker-walk-v0__x__3__")


@pytest.mark.parametrize("script", AGENT_SCRIPTS)
@pytest.mark.parametrize(
    "settings, flag",
    [
        (dict(num_envs=100_000), "--num-envs"),  # a worker process each: it forked until the OOM killer came
        (dict(buffer_size=100_000_000_000), "--buffer-size"),  # a 50-line RESOURCE_EXHAUSTED traceback
        (dict(exp_name="a/b"), "--exp-name"),  # nested run folders
        (dict(exp_name=""), "--exp-name"),
        (dict(seed=-1), "--seed"),  # no environment takes it
        (dict(batch_size=10**9), "--batch-size"),  # out of memory at the first update
    ],
)
def test_what_cannot_fit_or_be_named_is_refused_in_one_line_before_anything_starts(
    tmp_path, monkeypatch, script, settings, flag
):
    monkeypatch.chdir(tmp_path)
    module = SCRIPTS[script]
    with pytest.raises(SystemExit) as exit_info:
        module.main(module.Args(env_id="cartpole-swingup", **settings))
    text = str(exit_info.value)
    assert text.startswith("error: ") and flag in text and "\n" not in text
    assert not os.path.exists(tmp_path / "runs")


@pytest.mark.parametrize(
    "script, settings, flag",
    [  # each was a RESOURCE_EXHAUSTED traceback, at once or at the first update, and a run folder left behind
        ("qmle_dmc.py", dict(m_greedy=2 * 10**9), "--m-greedy"),
        ("qmle_dmc.py", dict(m_target=10**7), "--m-target"),
        ("qmle_dmc.py", dict(num_bins=10**8), "--num-bins"),
        ("qtopt_cem.py", dict(cem_samples=2 * 10**9), "--cem-samples"),
        ("aql_discrete.py", dict(m_uniform=2 * 10**9), "--m-uniform"),
        ("aql_discrete.py", dict(n_proposal=2 * 10**9), "--n-proposal"),
        ("wolpertinger.py", dict(knn="approx", recall_target=0.0), "--recall-target"),  # XLA's approx_max_k fails
    ],
)
def test_a_search_that_cannot_fit_or_run_is_refused_in_one_line_before_anything_starts(
    tmp_path, monkeypatch, script, settings, flag
):
    test_what_cannot_fit_or_be_named_is_refused_in_one_line_before_anything_starts(
        tmp_path, monkeypatch, script, settings, flag
    )


@pytest.mark.parametrize(
    "script, settings",
    [
        ("qmle_dmc.py", dict(m_greedy=10_000, m_target=1000, num_bins=11)),
        ("qtopt_cem.py", dict(cem_samples=1000, cem_elites=100)),
        ("aql_discrete.py", dict(n_proposal=100, m_uniform=1000, num_bins=11)),
    ],
)
def test_the_search_estimates_refuse_no_research_setting_an_8_gb_gpu_holds(monkeypatch, script, settings):
    # dog-walk's 38 dimensions, 64 environments, batches of 4096: XLA takes 2.3 GiB for qmle_dmc.py's largest search
    module, needs = SCRIPTS[script], []
    monkeypatch.setattr(module, "check_fits", lambda what, nbytes, host=False: needs.append(nbytes))
    args = module.Args(batch_size=4096, num_envs=64, **settings)
    bins = (11,) if script == "aql_discrete.py" else ()  # aql's takes its sub-actions' bins too
    module.check_searches(args, 38, *bins)
    assert needs and max(needs) < 8 * 2**30


def test_worker_processes_are_forked_before_jax_starts(tmp_path):
    # JAX is multithreaded: a fork after it starts can deadlock (it warns). A fresh process runs each agent to its fork.
    code = f"""if True:
        import importlib, sys, jax._src.xla_bridge as xla_bridge
        sys.path.insert(0, {ROOT!r})
        for name in {[script[:-3] for script in AGENT_SCRIPTS]!r}:
            agent = importlib.import_module(name)
            class Forking(Exception):
                pass
            def make_envs(*args):
                raise Forking
            agent.make_envs = make_envs
            try:
                agent.main(agent.Args(env_id="Pendulum-v1", num_envs=2))
            except Forking:
                print(name, xla_bridge.backends_are_initialized())"""
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.stdout.split() == [word for s in AGENT_SCRIPTS for word in (s[:-3], "False")], result.stderr[-2000:]


def test_a_refusal_from_the_command_line_is_one_line_and_status_1_even_after_the_worker_processes_start(tmp_path):
    flags = ("--env-id", "Pendulum-v1", "--num-envs", "2", "--m-greedy", "2000000000")
    result = run_script("qmle_dmc.py", *flags, cwd=tmp_path)  # it returns once the workers close their output too
    assert one_error_line(result, "--m-greedy"), result.stderr[-2000:]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder")
def test_a_read_only_working_folder_is_one_line(tmp_path):
    os.chmod(tmp_path, stat.S_IRUSR | stat.S_IXUSR)
    try:
        result = run_script("qmle_dmc.py", "--env-id", "cartpole-swingup", "--total-timesteps", "10", cwd=tmp_path)
    finally:
        os.chmod(tmp_path, stat.S_IRWXU)
    assert one_error_line(result, "runs/"), result.stderr[-2000:]


@pytest.mark.parametrize("script", AGENT_SCRIPTS)
def test_a_run_folder_that_cannot_be_created_is_one_line(tmp_path, monkeypatch, script):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").write_text("a file where the runs folder goes")
    module = SCRIPTS[script]
    with pytest.raises(SystemExit) as exit_info:
        module.new_run_dir(module.Args(env_id="cartpole-swingup"))
    assert str(exit_info.value).startswith("error: ") and "runs/cartpole-swingup__" in str(exit_info.value)


@pytest.mark.parametrize("script", ["bandit_illustration.py", "climbing_game.py"])
def test_an_output_dir_that_cannot_be_created_is_one_line(tmp_path, script):
    (tmp_path / "a_file").write_text("")
    bad = str(tmp_path / "a_file" / "figures")  # a folder inside a file: NotADirectoryError
    with pytest.raises(SystemExit) as exit_info:
        SCRIPTS[script].main(SCRIPTS[script].Args(output_dir=bad))
    assert str(exit_info.value).startswith(f"error: --output-dir {bad}")


def test_the_largest_seed_accepted_is_one_every_reset_of_a_run_takes():
    # three evaluation episodes reset with --seed + 10000, + 10001 and + 10002: Gymnasium's own limit must admit the
    # last of them for the largest accepted seed, and refuse one past it (a tighter check would refuse good seeds)
    args = qmle_dmc.Args(env_id="cartpole-swingup", eval_episodes=3)
    largest = 2**32 - 1 - 10_002
    qmle_dmc.check_args(dataclasses.replace(args, seed=largest))
    with pytest.raises(SystemExit, match="--seed"):
        qmle_dmc.check_args(dataclasses.replace(args, seed=largest + 1))
    env = qmle_dmc.make_env("cartpole-swingup", largest)  # DeepMind Control's seeds are numpy's: below 2**32
    env.reset(seed=largest + 10_002)
    with pytest.raises(Exception, match="Seed must be"):
        env.reset(seed=largest + 10_003)
    many = dataclasses.replace(args, num_envs=20, buffer_size=1000)
    qmle_dmc.check_args(dataclasses.replace(many, seed=largest))  # its 20 environments stay below the evaluations'


@pytest.mark.parametrize("script", AGENT_SCRIPTS)
def test_a_run_that_would_end_before_its_first_update_is_warned_of(capsys, script):
    module = SCRIPTS[script]
    module.check_args(module.Args(total_timesteps=5000, learning_starts=4999))
    assert capsys.readouterr().err == ""
    module.check_args(module.Args(total_timesteps=5000, learning_starts=5000))
    assert capsys.readouterr().err.startswith("warning: --learning-starts")


@pytest.mark.parametrize("module", [bandit_illustration, climbing_game])
def test_an_illustration_takes_only_seeds_its_int32_keys_hold(module):
    args = module.Args(num_seeds=4)  # seeds --seed ... --seed + 3
    module.check_args(dataclasses.replace(args, seed=2**31 - 4))
    assert int(jnp.asarray(2**31 - 4 + np.arange(4))[-1]) == 2**31 - 1  # the last run's seed reaches JAX intact
    for bad in (-1, 2**31 - 3):
        with pytest.raises(SystemExit, match="^error: --seed"):
            module.check_args(dataclasses.replace(args, seed=bad))


@pytest.mark.parametrize(
    "module, settings, flag",
    [  # each ran, and ended in a traceback (or a C++ abort) or, for --ou-theta, a figure of NaN
        (bandit_illustration, dict(num_seeds=10**8), "--num-seeds"),
        (bandit_illustration, dict(ou_theta=5.0), "--ou-theta"),
        (climbing_game, dict(num_seeds=10**8), "--num-seeds"),
        (climbing_game, dict(obs_dim=10**9), "--obs-dim"),
    ],
)
def test_an_illustration_refuses_what_cannot_fit_or_settle_before_anything_starts(tmp_path, module, settings, flag):
    out = tmp_path / "figures"
    text = refusal(module.main, module.Args(output_dir=str(out), **settings))
    assert flag in text and not out.exists()


def test_help_is_tyros_whole_help_on_stdout(tmp_path):
    result = run_script("qmle_dmc.py", "--help", cwd=tmp_path)
    assert result.returncode == 0 and result.stderr == "" and "--m-target INT" in result.stdout
    assert "candidates per replayed transition" in result.stdout  # the flag's comment is its help


def test_track_without_a_wandb_login_is_one_line_and_leaves_no_run_folder(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(tmp_path), WANDB_CONFIG_DIR=str(tmp_path / "wandb-config"))  # no saved login either
    flags = ["--env-id", "cartpole-swingup", "--total-timesteps", "300", "--learning-starts", "100", "--track"]
    result = run_script("qmle_dmc.py", *flags, cwd=tmp_path, env=env)
    assert one_error_line(result, "--track"), result.stderr[-2000:]
    assert os.listdir(tmp_path / "runs") == []


def readme_paths():
    """Relative link targets of the README, and the repository paths it quotes in backquotes (under a folder of the
    repository, or a file at its top), placeholders (runs/<run>/...) and what a run writes left out."""
    text = open(os.path.join(ROOT, "README.md")).read()
    links = [p for p in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text) if not re.match(r"[a-z]+:", p)]
    quoted = [
        q
        for q in re.findall(r"`([^`\s]+)`", text)
        if re.fullmatch(r"(\.\./|\./|\.ci/|docs/|benchmarks/|tests/)[\w./-]*|\w+\.(py|md|txt)", q)
    ]
    return sorted({p.rstrip("/") for p in links + quoted})


def test_every_relative_link_and_path_in_the_readme_exists_in_a_clone():
    paths = readme_paths()
    assert "requirements.txt" in paths and any(p.startswith("docs/") for p in paths)  # the parser finds them
    outside = [p for p in paths if os.path.relpath(os.path.join(ROOT, p), ROOT).startswith("..")]
    assert outside == []  # a clone has nothing beside it
    missing = [p for p in paths if not os.path.exists(os.path.join(ROOT, p))]
    assert missing == []
