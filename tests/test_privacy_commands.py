"""``fedcomm report`` / ``fedcomm audit`` on real ledgers: what they print and return."""

from __future__ import annotations

import functools
import io
import json
import math
import time
from pathlib import Path

import pytest
from rich.console import Console

from fedcomm.commands import privacy as commands
from fedcomm.commands.privacy import audit_command, message_setup, report_command
from fedcomm.privacy import canary
from fedcomm.privacy.events import gaussian_release
from fedcomm.privacy.ledger import Ledger, config_hash
from fedcomm.privacy.report import REPORT_NAME, RunInfo, build_report, write_report
from tests.test_privacy_report import edit_ledger_line

SIGMA = 8.0  # message noise: a claim small enough for a one-run audit to test
CONFIG = {"env": "platoon", "comm": {"noise_multiplier": SIGMA, "clip": 1.0}}
MECHANISMS = {"message": {"noise_multiplier": SIGMA, "clip": 1.0},
              "feedback": {"noise_multiplier": 3.0, "clip": 0.5}}
T = 8  # message releases per batch


def make_run(run_dir: Path, *, feedback_sigma: float = 3.0, budget: float = 100.0) -> dict:
    (run_dir / "ledgers").mkdir(parents=True)
    paths = {}
    for agent in ("a0", "a1"):
        paths[agent] = run_dir / "ledgers" / f"{agent}.jsonl"
        with Ledger(paths[agent], agent, config_hash(CONFIG)) as ledger:
            for r in range(3):
                # T messages in two entries, as a run that releases per step might write them
                for release in (gaussian_release("message", SIGMA, 1.0, count=T - 3),
                                gaussian_release("message", SIGMA, 1.0, count=3),
                                gaussian_release("feedback", feedback_sigma, 0.5)):
                    ledger.append(release, round=r, batch=r, unit="episode")
    mechanisms = {**MECHANISMS, "feedback": {"noise_multiplier": feedback_sigma, "clip": 0.5}}
    run = RunInfo(config=CONFIG, delta=1e-5, budget=budget, mechanisms=mechanisms)
    report = build_report(paths, run, run_dir)
    write_report(report, run_dir)
    return report


def console() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, width=250, color_system=None), out


def test_report_command_renders_the_page(tmp_path):
    make_run(tmp_path)
    html = report_command(tmp_path)
    assert html == tmp_path / "privacy_report.html"
    assert "Privacy report" in html.read_text() and "a1" in html.read_text()
    with pytest.raises(FileNotFoundError, match=r"no privacy report in .*privacy_report\.json"):
        report_command(tmp_path / "ledgers")


@pytest.mark.parametrize("target", ["dir", "file"])
def test_clean_run_is_verified(tmp_path, target):
    report = make_run(tmp_path)
    con, out = console()
    path = tmp_path if target == "dir" else tmp_path / REPORT_NAME
    assert audit_command(path, False, con) == 0
    text = out.getvalue()
    assert text.rstrip().endswith("verified")
    assert "Independent recomputation" in text and "FAILED" not in text
    claimed = report["agents"]["a0"]["composed"]["epsilon"]
    assert f"{claimed:.6f}" in text


def test_edited_ledger_line_fails_and_is_named(tmp_path):
    make_run(tmp_path)
    edit_ledger_line(tmp_path / "ledgers" / "a1.jsonl", 3, count=1)  # fewer releases than made
    con, out = console()
    assert audit_command(tmp_path, False, con) == 1
    text = out.getvalue()
    assert "ledgers/a1.jsonl:4" in text and "a field was edited" in text
    assert text.rstrip().splitlines()[-1].startswith("FAILED (")


def test_no_report_to_read_is_exit_2_and_a_report_that_fails_exit_1(tmp_path, capsys):
    """A script tells "could not read" (2) from "did not verify" (1)."""
    from fedcomm.commands import main

    for missing in (tmp_path, tmp_path / "nothing", tmp_path / "nothing" / REPORT_NAME):
        assert main(["audit", str(missing)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: no privacy report at") and len(err.splitlines()) == 1
    make_run(tmp_path)
    (tmp_path / REPORT_NAME).write_text("{not json")
    assert main(["audit", str(tmp_path)]) == 1
    assert "cannot read the report" in capsys.readouterr().err


@pytest.mark.parametrize("fold", [False, True])
def test_empirical_audit_of_an_honest_run(tmp_path, monkeypatch, fold):
    if fold:  # T releases simulated as one with sigma / sqrt(T), as for long histories
        monkeypatch.setattr(commands, "MAX_NORMALS", 1)
    make_run(tmp_path)
    setup = message_setup(json.loads((tmp_path / REPORT_NAME).read_text()), tmp_path)
    assert (setup["noise_multiplier"], setup["clip"], setup["relation"]) == \
        (SIGMA, 1.0, "replace_one")
    assert setup["releases_per_unit"] == T and setup["source"] == "ledgers"
    con, out = console()
    start = time.perf_counter()
    assert audit_command(tmp_path, True, con, canaries=10_000, seed=0) == 0
    assert time.perf_counter() - start < 10
    text = out.getvalue()
    assert "95% lower bound" in text and f"{T} releases per unit" in text
    assert text.rstrip().endswith("verified")


def test_empirical_audit_catches_a_leaky_mechanism(tmp_path, monkeypatch):
    make_run(tmp_path)
    # The mechanism adds an eighth of the noise its ledger and report state.
    monkeypatch.setattr(canary, "empirical_audit",
                        functools.partial(canary.empirical_audit, true_noise_multiplier=1.0))
    con, out = console()
    assert audit_command(tmp_path, True, con, canaries=10_000, seed=0) == 1
    text = out.getvalue()
    assert "exceeds the claimed epsilon" in text and "FAILED (1 problem)" in text


def test_message_count_falls_back_to_the_report(tmp_path):
    report = make_run(tmp_path)
    (tmp_path / "ledgers" / "a0.jsonl").unlink()
    setup = message_setup(report, tmp_path)
    # The report states totals only: count per ledger entry (two per batch here), which is
    # why the ledgers come first; the output says which source was used.
    assert setup["releases_per_unit"] == T // 2 and setup["source"].startswith("report")


def test_infinite_report_is_verified_and_printed(tmp_path):
    make_run(tmp_path, feedback_sigma=0.0, budget=math.inf)
    con, out = console()
    assert audit_command(tmp_path, True, con, canaries=10_000, seed=1) == 0
    text = out.getvalue()
    assert " inf " not in text and text.count("∞") == 8  # reported and recomputed, 2 agents
    assert text.rstrip().endswith("verified")
