"""The two blocks every agent script carries its own copy of, so that each script stands alone: the replay buffer
and the run helpers. The copies must stay the same, or a fix to one leaves the others behind."""

import os
import re

import pytest
from conftest import ROOT

AGENTS = ["qmle_dmc.py", "qtopt_cem.py", "aql_discrete.py", "wolpertinger.py", "dqn_grid.py"]
BLOCKS = ["replay buffer", "run helpers"]


def block(script: str, name: str) -> str:
    text = open(os.path.join(ROOT, script)).read()
    begin, end = f"# === {name}: begin (identical in every agent script) ===", f"# === {name}: end ==="
    match = re.search(re.escape(begin) + r"\n(.*?)" + re.escape(end), text, re.S)
    assert match, f"{script} lacks the {name} marker lines"
    return match.group(1)


@pytest.mark.parametrize("name", BLOCKS)
@pytest.mark.parametrize("script", AGENTS[1:])
def test_each_shared_block_is_the_same_in_every_agent_script(script, name):
    reference = block("qmle_dmc.py", name)
    assert len(reference.splitlines()) > 50  # the markers enclose the block, not a stray pair of lines
    assert block(script, name) == reference, f"the {name} block in {script} differs from qmle_dmc.py's"
