"""The learning report's figures: one colour per system whatever its experiment is called, legends in the docs'
words, and the shaded band said to be ±1 standard error over the seeds."""

import csv
import os
import sys

import matplotlib.figure

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import learning  # noqa: E402


def test_a_system_at_its_defaults_keeps_its_colour_under_any_experiment_name():
    colours = learning.colours_of(["release", "qmle_n1", "qmle_n16", "qmle_n1_gpu", "qmle_dmc", "qmle_n4", "aql",
                                   "aql_discrete", "qtopt_cem", "uniformql", "wolpertinger"])
    assert colours["release"] == "black"
    assert colours["qmle_n1"] == "C0"  # --num-envs 1: the default
    for name in ("qmle_dmc", "qmle_n1_gpu"):  # alone, each is QMLE at its defaults and wears its colour
        assert learning.colours_of(["release", name])[name] == "C0"
    # beside the first, later experiments of the same system are told apart: no two lines share a colour
    assert len(set(colours.values())) == len(colours)
    assert colours["aql"] == learning.colours_of(["aql_discrete"])["aql_discrete"] == "C2"
    assert (colours["qtopt_cem"], colours["uniformql"], colours["wolpertinger"]) == ("C1", "C3", "C4")
    # variants (16 or 4 environments) take the next free colours, none of a system's
    assert colours["qmle_n16"] != colours["qmle_n4"]
    assert not {colours["qmle_n16"], colours["qmle_n4"]} & set(learning.COLOURS.values())
    # with only QMLE and the release shown, six variants take six colours, the absent systems' among them
    variants = learning.colours_of(["release", "qmle_n1"] + [f"v{i}" for i in range(6)])
    assert len({variants[f"v{i}"] for i in range(6)}) == 6
    assert not {variants[f"v{i}"] for i in range(6)} & {"C0", "black", "grey"}


def write_curves(path, exp_names, seeds=(1, 2, 3)):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["exp_name", "env_id", "seed", "step", "episodic_return"])
        for i, name in enumerate(exp_names):
            writer.writerows([name, "walker-walk", seed, 1000 * step, 10.0 * i + seed + step]
                             for seed in seeds for step in range(1, 11))


def plotted(monkeypatch, tmp_path, exp_names, labels=()):
    """Report the experiments from a curves file (the release among them) and return the saved figure."""
    figures, save = [], matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda fig, *a, **k: (figures.append(fig), save(fig, *a, **k)))
    path = str(tmp_path / f"{'_'.join(exp_names)}.csv")
    write_curves(path, ["release", *exp_names])
    learning.report(learning.Report(runs_dir=str(tmp_path / "none"), exp_names=list(exp_names), curves=[path],
                                    release_curves=[path], labels=list(labels), output_dir=str(tmp_path / "out")))
    return figures[-1]


def test_each_system_has_one_colour_in_every_figure_and_the_band_is_explained(monkeypatch, tmp_path):
    one = plotted(monkeypatch, tmp_path, ["qmle_dmc", "qmle_tnf2000", "aql"],
                  labels=["release=authors' release", "qmle_dmc=qmle_dmc.py", "qmle_tnf2000=target period 2000"])
    other = plotted(monkeypatch, tmp_path, ["qmle_n4", "qmle_n1"],
                    labels=["release=authors' release", "qmle_n1=qmle_dmc.py", "qmle_n4=--num-envs 4"])
    colours = [{line.get_label(): line.get_color() for ax in fig.axes for line in ax.lines} for fig in (one, other)]
    assert colours[0]["authors' release"] == colours[1]["authors' release"] == "black"
    assert colours[0]["qmle_dmc.py"] == colours[1]["qmle_dmc.py"] == "C0"
    assert colours[0]["target period 2000"] not in ("black", "C0", "C2")
    (legend,) = one.legends
    texts = [t.get_text() for t in legend.get_texts()]
    assert texts == ["authors' release (3 seeds)", "qmle_dmc.py (3 seeds)", "target period 2000 (3 seeds)",
                     "aql (3 seeds)"]
    assert "±1 standard error" in legend.get_title().get_text()
