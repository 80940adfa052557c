"""What every script shares: each numeric flag refuses NaN and infinity with one line, from the command line as
from Python, and the README names only paths that exist in a clone."""

import dataclasses
import os
import re
import subprocess
import sys
from typing import List, Optional, get_type_hints

import gymnasium as gym
import jax.numpy as jnp
import numpy as np
import pytest

import aql_discrete
import bandit_illustration
import climbing_game
import dqn_grid
import qmle_dmc
import qtopt_cem
import wolpertinger
from conftest import ROOT, run_script

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import checkpoint  # noqa: E402
import ablations  # noqa: E402
import learning  # noqa: E402
import speed  # noqa: E402

SCRIPTS = {"qmle_dmc.py": qmle_dmc, "qtopt_cem.py": qtopt_cem, "aql_discrete.py": aql_discrete,
           "wolpertinger.py": wolpertinger, "dqn_grid.py": dqn_grid, "bandit_illustration.py": bandit_illustration,
           "climbing_game.py": climbing_game}
AGENT_SCRIPTS = ["qmle_dmc.py", "qtopt_cem.py", "aql_discrete.py", "wolpertinger.py", "dqn_grid.py"]
FLOAT_FLAGS = [(script, field.name) for script, module in SCRIPTS.items()
               for field in dataclasses.fields(module.Args) if field.type in (float, "float")]


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
    assert str(exit_info.value) == f"error: --{name.replace('_', '-')} must be a finite number, got {value}"


@pytest.mark.parametrize("script, flag", [("qmle_dmc.py", "--delta-noise-std"), ("wolpertinger.py", "--tau"),
                                          ("climbing_game.py", "--local-std")])
def test_nan_from_the_command_line_is_one_line_and_status_1(tmp_path, script, flag):
    result = run_script(script, flag, "nan", cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [f"error: {flag} must be a finite number, got nan"]
    assert not os.path.exists(tmp_path / "runs")  # refused before anything was started


# Every parser of every script: (script, subcommand, module, dataclass); learning.py and ablations.py have one per
# subcommand.
PARSERS = [(script, None, module, module.Args) for script, module in SCRIPTS.items()] + [
    ("benchmarks/speed.py", None, qmle_dmc, speed.Args), ("benchmarks/checkpoint.py", None, qmle_dmc, checkpoint.Args)
] + [("benchmarks/learning.py", mode, learning, cls) for mode, cls in
     dict(run=learning.Run, print=learning.Print, report=learning.Report, random=learning.Random).items()] + [
    ("benchmarks/ablations.py", mode, learning, cls) for mode, cls in
    dict(list=ablations.Listing, run=ablations.Run, print=ablations.Print, report=ablations.Report).items()]
INT_FLAGS = [(script, mode, module, cls, f"--{name.replace('_', '-')}") for script, mode, module, cls in PARSERS
             for name, hint in get_type_hints(cls).items() if hint in (int, Optional[int], List[int])]


def test_every_parser_has_whole_number_flags_to_check():
    # the table is built from the dataclasses: make sure it found them, lists and optional ones included
    assert {(script, mode) for script, mode, *_ in INT_FLAGS} == {(script, mode) for script, mode, *_ in PARSERS}
    found = {(script, flag) for script, _, _, _, flag in INT_FLAGS}
    assert {("qmle_dmc.py", "--total-timesteps"), ("wolpertinger.py", "--k"), ("benchmarks/speed.py", "--num-envs"),
            ("benchmarks/learning.py", "--seeds"), ("benchmarks/checkpoint.py", "--transitions")} <= found
    assert not any(flag == "--track" for _, flag in found)  # a bool is no whole-number flag


@pytest.mark.parametrize("script, mode, module, cls, flag", INT_FLAGS, ids=[f"{s}{' ' + m if m else ''} {f}"
                                                                              for s, m, _, _, f in INT_FLAGS])
def test_every_whole_number_flag_refuses_nan_and_infinity(script, mode, module, cls, flag):
    # what each script's __main__ checks before tyro parses (tyro would print a boxed message and exit with 2); a
    # string code is one line on stderr and exit status 1 (Python's own handling of SystemExit)
    underscores = "--" + flag[2:].replace("-", "_")  # tyro takes --total_timesteps too
    for argv, value in [([flag, "nan"], "nan"), ([f"{flag}=inf"], "inf"), ([flag, "1", "-inf"], "-inf"),
                        ([underscores, "1.5"], "1.5")]:
        with pytest.raises(SystemExit) as exit_info:
            module.check_whole_numbers(cls, ["--exp-name", "nan", "--env-ids", "inf", *argv])  # text flags: any value
        assert exit_info.value.code == f"error: {flag}: expected a whole number, got {value!r}"
    module.check_whole_numbers(cls, [flag, "3", f"{flag}=-1_000", flag, "4", "5", "--exp-name", "nan"])  # these pass
    if get_type_hints(cls)[flag[2:].replace("-", "_")] == Optional[int]:
        module.check_whole_numbers(cls, [flag, "None"])


@pytest.mark.parametrize("script, argv, message", [  # each script's __main__, and each subcommand of learning.py
    ("qmle_dmc.py", ["--total-timesteps", "nan"], "--total-timesteps: expected a whole number, got 'nan'"),
    ("qtopt_cem.py", ["--cem-samples=inf"], "--cem-samples: expected a whole number, got 'inf'"),
    ("aql_discrete.py", ["--num-bins", "1.5"], "--num-bins: expected a whole number, got '1.5'"),
    ("wolpertinger.py", ["--k", "nan"], "--k: expected a whole number, got 'nan'"),
    ("dqn_grid.py", ["--batch-size", "inf"], "--batch-size: expected a whole number, got 'inf'"),
    ("bandit_illustration.py", ["--pulls-per-step", "inf"], "--pulls-per-step: expected a whole number, got 'inf'"),
    ("climbing_game.py", ["--buffer-size", "nan"], "--buffer-size: expected a whole number, got 'nan'"),
    ("benchmarks/learning.py", ["run", "--seeds", "1", "nan"], "--seeds: expected a whole number, got 'nan'"),
    ("benchmarks/learning.py", ["print", "--total-timesteps=inf"],
     "--total-timesteps: expected a whole number, got 'inf'"),
    ("benchmarks/learning.py", ["report", "--last-episodes", "inf"],
     "--last-episodes: expected a whole number, got 'inf'"),
    ("benchmarks/learning.py", ["random", "--episodes", "nan"], "--episodes: expected a whole number, got 'nan'"),
    ("benchmarks/ablations.py", ["list", "--figures", "8.5"], "--figures: expected a whole number, got '8.5'"),
    ("benchmarks/speed.py", ["--timesteps", "nan"], "--timesteps: expected a whole number, got 'nan'"),
    ("benchmarks/checkpoint.py", ["--transitions", "inf"], "--transitions: expected a whole number, got 'inf'")])
def test_a_whole_number_flag_given_nan_is_one_line_and_status_1_from_the_command_line(tmp_path, script, argv, message):
    result = run_script(script, *argv, cwd=tmp_path)
    assert result.returncode == 1 and result.stderr.strip().splitlines() == [f"error: {message}"], result.stderr[-2000:]


@pytest.mark.parametrize("script", AGENT_SCRIPTS)
@pytest.mark.parametrize("env_id", ["cartpole-swingup", "CartPole-v1"])
def test_gamma_1_warns_naming_the_task_without_claiming_it_never_terminates(capsys, script, env_id):
    module = SCRIPTS[script]
    module.check_args(module.Args(env_id=env_id, gamma=1.0))  # a warning, not a refusal
    assert capsys.readouterr().err.splitlines() == [
        f"warning: --gamma 1 does not discount: on {env_id}, Q grows without bound unless every episode ends in a "
        "terminal state (a time limit is not one)"]
    module.check_args(module.Args(env_id=env_id, gamma=0.99))
    assert capsys.readouterr().err == ""


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
    assert str(exit_info.value) == ("error: --env-id 'BrokenForTest-v0' is registered but cannot be made: "
                                    "ImportError: needs a package this machine lacks")


@pytest.mark.parametrize("script", AGENT_SCRIPTS)
def test_capture_video_without_a_renderer_is_one_line_before_anything_starts(tmp_path, script):
    # a GPU machine without libEGL: the renderer cannot start, which used to surface at the first evaluation
    env = dict(os.environ, MUJOCO_GL="disable")
    short = ["--total-timesteps", "200", "--learning-starts", "100", "--eval-frequency", "100", "--eval-episodes", "1"]
    result = run_script(script, "--env-id", "cartpole-swingup", "--capture-video", *short, cwd=tmp_path, env=env)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: --capture-video cannot render 'cartpole-swingup' with MUJOCO_GL='disable': RuntimeError: No OpenGL "
        "rendering backend is available; MuJoCo renders offscreen with libEGL (MUJOCO_GL=egl; e.g. apt install "
        "libegl1) or OSMesa (MUJOCO_GL=osmesa)"]
    assert not os.path.exists(tmp_path / "runs")


@pytest.mark.parametrize("script", AGENT_SCRIPTS)
def test_a_renderer_that_cannot_load_is_one_line_at_import(tmp_path, script):
    # dm_control loads MUJOCO_GL's renderer when shimmy imports it, so even --help died in a traceback
    result = run_script(script, "--help", cwd=tmp_path, env=dict(os.environ, MUJOCO_GL="nonsense"))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: dm_control cannot be imported with MUJOCO_GL='nonsense': RuntimeError: ")
    assert line.endswith("; MUJOCO_GL=disable runs without a renderer (no --capture-video)")
    assert "chosen because" not in line  # the user's own setting, not the scripts' choice


@pytest.mark.parametrize("script", AGENT_SCRIPTS)
def test_without_libegl_the_scripts_import_without_a_renderer_and_step(tmp_path, script):
    # a machine where the EGL library cannot be found, with MUJOCO_GL unset: no renderer is asked for
    env = {k: v for k, v in os.environ.items() if k != "MUJOCO_GL"}
    code = (f"import ctypes.util, os, sys; ctypes.util.find_library = lambda name: None; sys.path.insert(0, {ROOT!r}); "
            f"import {script[:-3]} as agent; print(os.environ['MUJOCO_GL']); env = agent.make_env('walker-walk', 0); "
            "env.reset(seed=0); print(env.step(env.action_space.sample())[0].shape)")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
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


@pytest.mark.parametrize("script", ["bandit_illustration.py", "climbing_game.py"])
def test_an_output_dir_that_cannot_be_created_is_one_line(tmp_path, script):
    (tmp_path / "a_file").write_text("")
    bad = str(tmp_path / "a_file" / "figures")  # a folder inside a file: NotADirectoryError
    with pytest.raises(SystemExit) as exit_info:
        SCRIPTS[script].main(SCRIPTS[script].Args(output_dir=bad))
    assert str(exit_info.value) == f"error: --output-dir {bad} cannot be created: Not a directory"


@pytest.mark.parametrize("script", AGENT_SCRIPTS)
def test_a_seed_the_environments_cannot_take_is_one_line_before_anything_starts(tmp_path, script):
    result = run_script(script, "--seed", "-1", cwd=tmp_path)
    largest = 2**32 - 1 - 10_000  # the default one evaluation episode resets with --seed + 10000
    assert result.returncode == 1 and result.stderr.strip() == f"error: --seed must be in [0, {largest}], got -1"
    assert not os.path.exists(tmp_path / "runs")


def test_the_largest_seed_accepted_is_one_every_reset_of_a_run_takes():
    # three evaluation episodes reset with --seed + 10000, + 10001 and + 10002: Gymnasium's own limit must admit the
    # last of them for the largest accepted seed, and refuse one past it (a tighter check would refuse good seeds)
    args = qmle_dmc.Args(env_id="cartpole-swingup", eval_episodes=3)
    largest = 2**32 - 1 - 10_002
    qmle_dmc.check_seed_and_start(dataclasses.replace(args, seed=largest))
    with pytest.raises(SystemExit, match=rf"^error: --seed must be in \[0, {largest}\], got {largest + 1}$"):
        qmle_dmc.check_seed_and_start(dataclasses.replace(args, seed=largest + 1))
    env = qmle_dmc.make_env("cartpole-swingup", largest)  # DeepMind Control's seeds are numpy's: below 2**32
    env.reset(seed=largest + 10_002)
    with pytest.raises(Exception, match="Seed must be"):
        env.reset(seed=largest + 10_003)
    many = dataclasses.replace(args, num_envs=20_000)  # environments --seed ... --seed + 19999 outnumber the episodes
    qmle_dmc.check_seed_and_start(dataclasses.replace(many, seed=2**32 - 20_000))
    with pytest.raises(SystemExit):
        qmle_dmc.check_seed_and_start(dataclasses.replace(many, seed=2**32 - 19_999))


@pytest.mark.parametrize("script", AGENT_SCRIPTS)
def test_a_run_that_would_end_before_its_first_update_is_warned_of(capsys, script):
    module = SCRIPTS[script]
    module.check_seed_and_start(module.Args(total_timesteps=5000, learning_starts=4999))
    assert capsys.readouterr().err == ""
    module.check_seed_and_start(module.Args(total_timesteps=5000, learning_starts=5000))
    assert capsys.readouterr().err == ("warning: --learning-starts 5000 is not below --total-timesteps 5000: the run "
                                       "ends before its first update\n")


@pytest.mark.parametrize("module", [bandit_illustration, climbing_game])
def test_an_illustration_takes_only_seeds_its_int32_keys_hold(module):
    args = module.Args(num_seeds=4)  # seeds --seed ... --seed + 3
    module.check_args(dataclasses.replace(args, seed=2**31 - 4))
    assert int(jnp.asarray(2**31 - 4 + np.arange(4))[-1]) == 2**31 - 1  # the last run's seed reaches JAX intact
    for bad in (-1, 2**31 - 3):
        with pytest.raises(SystemExit, match=rf"^error: --seed must be in \[0, {2**31 - 4}\] with --num-seeds 4, "
                                             rf"got {bad}$"):
            module.check_args(dataclasses.replace(args, seed=bad))


@pytest.mark.parametrize("script, flags, message", [
    *[(script, ["--env-idd", "x"], "Unrecognized options: --env-idd, x (did you mean --env-id?)")
      for script in AGENT_SCRIPTS],
    *[(script, ["--num-seedz", "2"], "Unrecognized options: --num-seedz, 2 (did you mean --num-seeds?)")
      for script in ("bandit_illustration.py", "climbing_game.py")],
    ("qmle_dmc.py", ["--learning-rate", "abc"], "Error parsing --learning-rate: could not convert string to float: 'abc'"),
    ("qmle_dmc.py", ["--categorical-loss", "foo"],
     "invalid choice 'foo' for argument '--categorical-loss'. Expected one of ('logits', 'softmax-twice')."),
    ("qmle_dmc.py", ["--seed"], "Missing value for argument '--seed'. Expected 1 values."),
    ("qmle_dmc.py", ["--track", "yes"], "Unrecognized options: yes"),
])
def test_a_command_line_the_parser_refuses_is_one_line_and_status_1(tmp_path, script, flags, message):
    result = run_script(script, *flags, cwd=tmp_path)
    assert result.returncode == 1 and result.stderr.splitlines() == [f"error: {message}"], result.stderr[-2000:]
    assert not os.path.exists(tmp_path / "runs")


def test_a_refusal_is_one_line_where_the_output_cannot_draw_tyros_box(tmp_path):
    # without line-drawing characters (an ASCII or Latin-1 terminal) tyro draws its box in - | +
    result = run_script("qmle_dmc.py", "--seeed", "1", cwd=tmp_path, env=dict(os.environ, PYTHONIOENCODING="ascii"))
    assert result.returncode == 1
    assert result.stderr.splitlines() == ["error: Unrecognized options: --seeed, 1 (did you mean --seed?)"]


def test_help_is_still_tyros_whole_help_on_stdout(tmp_path):
    result = run_script("qmle_dmc.py", "--help", cwd=tmp_path)
    assert result.returncode == 0 and result.stderr == "" and "--m-target INT" in result.stdout


def test_track_without_a_wandb_login_is_one_line_and_leaves_no_run_folder(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(tmp_path), WANDB_CONFIG_DIR=str(tmp_path / "wandb-config"))  # no saved login either
    result = run_script("qmle_dmc.py", "--env-id", "cartpole-swingup", "--total-timesteps", "300", "--learning-starts",
                        "100", "--track", cwd=tmp_path, env=env)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr[-2000:]
    assert lines[0].startswith("error: --track: W&B could not start: ") and "WANDB_MODE=offline" in lines[0]
    assert os.listdir(tmp_path / "runs") == []


def readme_paths():
    """Relative link targets of the README, and the repository paths it quotes in backquotes (under a folder of the
    repository, or a file at its top), placeholders (runs/<run>/...) and what a run writes left out."""
    text = open(os.path.join(ROOT, "README.md")).read()
    links = [p for p in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text) if not re.match(r"[a-z]+:", p)]
    quoted = [q for q in re.findall(r"`([^`\s]+)`", text)
              if re.fullmatch(r"(\.\./|\./|\.ci/|docs/|benchmarks/|tests/)[\w./-]*|\w+\.(py|md|txt)", q)]
    return sorted({p.rstrip("/") for p in links + quoted})


def test_every_relative_link_and_path_in_the_readme_exists_in_a_clone():
    paths = readme_paths()
    assert "requirements.txt" in paths and any(p.startswith("docs/") for p in paths)  # the parser finds them
    outside = [p for p in paths if os.path.relpath(os.path.join(ROOT, p), ROOT).startswith("..")]
    assert outside == []  # a clone has nothing beside it
    missing = [p for p in paths if not os.path.exists(os.path.join(ROOT, p))]
    assert missing == []
