"""The run-management helpers every agent script carries its own copy of (so that each script stands alone), and
the whole-number check the other command-line scripts copy too:
the copies must stay the same, as the replay-buffer block must, or a fix to one leaves the others behind."""
import ast
import functools
import os

import pytest

from conftest import ROOT

AGENTS = ["qmle_dmc.py", "qtopt_cem.py", "aql_discrete.py", "wolpertinger.py", "dqn_grid.py"]
SHARED = ["adam", "fail", "flag", "check_whole_numbers", "dmc_gym_id", "make_envs", "make_worker_env", "record_video",
          "MetricsLogger", "new_run_dir", "save_arrays", "named_leaves", "checkpoint_file", "load_arrays", "restore",
          "saved_args", "stop_on_signals", "restore_signals", "check_seed_and_start", "start_wandb", "evaluation_video_dir",
          "command_path", "tyro_complaint", "parse_command_line"]


@functools.cache
def top_level_sources(script: str) -> dict:
    source = open(os.path.join(ROOT, script)).read()
    return {node.name: ast.get_source_segment(source, node) for node in ast.parse(source).body
            if isinstance(node, (ast.FunctionDef, ast.ClassDef))}


@pytest.mark.parametrize("name", SHARED)
def test_each_shared_helper_is_the_same_in_every_agent_script(name):
    copies = {script: top_level_sources(script).get(name) for script in AGENTS}
    assert copies["qmle_dmc.py"] is not None, f"qmle_dmc.py has no {name}"
    for script, source in copies.items():
        assert source == copies["qmle_dmc.py"], f"{name} in {script} differs from qmle_dmc.py's"


@pytest.mark.parametrize("script", ["bandit_illustration.py", "climbing_game.py", "benchmarks/learning.py"])
def test_the_other_scripts_check_whole_numbers_as_the_agents_do(script):
    assert top_level_sources(script)["check_whole_numbers"] == top_level_sources("qmle_dmc.py")["check_whole_numbers"]


@pytest.mark.parametrize("name", ["tyro_complaint", "parse_command_line"])
@pytest.mark.parametrize("script", ["bandit_illustration.py", "climbing_game.py"])
def test_the_illustrations_read_their_command_line_as_the_agents_do(script, name):
    assert top_level_sources(script)[name] == top_level_sources("qmle_dmc.py")[name]


def test_the_learning_runner_reads_tyros_refusals_as_the_agents_do():
    assert top_level_sources("benchmarks/learning.py")["tyro_complaint"] == top_level_sources("qmle_dmc.py")["tyro_complaint"]
