"""What every script shares: each numeric flag refuses NaN and infinity with one line, from the command line as
from Python, and the README names only paths that exist in a clone."""

import dataclasses
import os
import re

import pytest

import aql_discrete
import bandit_illustration
import climbing_game
import qmle_dmc
import qtopt_cem
import wolpertinger
from conftest import ROOT, run_script

SCRIPTS = {"qmle_dmc.py": qmle_dmc, "qtopt_cem.py": qtopt_cem, "aql_discrete.py": aql_discrete,
           "wolpertinger.py": wolpertinger, "bandit_illustration.py": bandit_illustration,
           "climbing_game.py": climbing_game}
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
