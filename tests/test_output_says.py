"""What a run prints, plots and reports says what the run did: the rounds it trains, the
episodes each team was evaluated on, its channel, what the server aggregates, whether it is
private at all, the audit's confidence as it is, and a chart only where there is something to
chart."""

from __future__ import annotations

import functools
import io
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from rich.console import Console

import fedcomm.privacy as privacy_package
from fedcomm.baselines import BASELINE_EPISODES, EvalResult
from fedcomm.commands import build_parser, federation_config_from_args
from fedcomm.commands.federated import run_federated
from fedcomm.commands.output import (
    console,
    gap_closed_text,
    print_result,
    privacy_text,
    rounds_text,
)
from fedcomm.config import FederationConfig, TrainConfig
from fedcomm.plots import curve_title, learning_curve
from fedcomm.privacy.accountants import DEFAULT_ACCOUNTANT
from fedcomm.privacy.accountants import rdp as rdp_module
from fedcomm.privacy.canary import CanaryAudit, percent
from fedcomm.privacy.events import RandomizedResponse, gaussian_release
from fedcomm.privacy.ledger import Ledger, config_hash
from fedcomm.privacy.page import epsilon_figure, render_html
from fedcomm.privacy.report import RunInfo, build_report
from fedcomm.releases.report import server_text
from fedcomm.summary import RunResult, RunSummary

PRIVATE = {"unit": "episode", "composition": "batch", "relation": "replace_one",
           "delta": 1e-5, "epsilon": {"message": 5.333, "update": 2.667}, "budget": 8.0,
           "split": None, "composed": 8.0, "within_budget": True}
# as summary.json holds it: "inf" for infinity
NON_PRIVATE = {**PRIVATE, "composition": "all", "budget": "inf", "composed": "inf",
               "epsilon": {"feedback": "inf", "message": 3.11e5, "update": "inf"}}
NOTHING = {**PRIVATE, "composition": "all", "epsilon": {}, "budget": math.inf, "composed": 0.0}
BASELINES = {"random": EvalResult(-41.0, 1.0, 1000), "no_comm": EvalResult(-15.6, 0.3, 64),
             "oracle": EvalResult(-7.6, 0.2, 1000), "ceiling": EvalResult(-7.7, 0.2, 1000)}


def summary(privacy: dict | None, final: EvalResult | None = None) -> RunSummary:
    return RunSummary.of(
        env="speaker_listener", mode="federated", final=final or EvalResult(-10.0, 0.5, 512),
        baselines=BASELINES, env_steps=12_800, train_time_s=10.0, wall_time_s=20.0,
        n_agents=2, agent_types=["speaker", "listener"], route_strength=torch.ones(2, 2),
        prune_threshold=0.3, rounds=1, strategy="fedavg", batches_per_round=16,
        privacy=privacy)


@pytest.fixture
def said(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture):
    """What the commands' console printed since the last call, one line per printed line."""
    monkeypatch.setattr(console, "_width", 400)  # no wrapping inside a sentence
    return lambda: capsys.readouterr().err


@functools.cache
def fed_of(*flags: str) -> FederationConfig:
    """The run ``fedcomm simulate FLAGS`` configures (the private default's calibration takes
    a second or two: once)."""
    return federation_config_from_args(build_parser().parse_args(["simulate", *flags]))


def row(text: str, name: str) -> list[str]:
    """The cells of the result table's row ``name``."""
    for line in text.splitlines():
        cells = [c.strip() for c in re.split(r"[│┃]", line) if c.strip()]
        if cells and cells[0] == name:
            return cells
    raise AssertionError(f"no row {name!r} in\n{text}")


# 1. the banner: what will run


def test_the_banner_says_the_rounds_batches_and_steps_that_will_run(tmp_path, said):
    args = build_parser().parse_args(["simulate", "--env", "factory", "--env-steps", "20000",
                                      "--out", str(tmp_path)])

    def run(fed, out, plan):
        return RunResult(out, summary(PRIVATE), [])

    assert run_federated(args, "simulate", run) == 0
    text = said()
    assert ("factory, 7 agents, 1 round of 1 episode batch per agent (12,800 env steps; "
            "20,000 asked, in whole batches of 512 episodes x 25 steps); server aggregates "
            "nothing") in text  # --share none, the factory's default
    assert "8 batches" not in text and "fedavg" not in text


def test_rounds_text_names_a_shorter_last_round_and_what_a_resumed_run_has_left():
    fed = FederationConfig(train=TrainConfig(env="speaker_listener", env_steps=12_800 * 20),
                           batches_per_round=16)
    assert rounds_text(fed) == "2 rounds of 16 episode batches per agent, the last of 4 " \
                               "(256,000 env steps)"
    assert rounds_text(fed, done=1) == "round 2 of 2: 1 round of 4 episode batches per " \
                                       "agent (51,200 env steps)"
    longer = FederationConfig(train=fed.train, batches_per_round=4)
    assert rounds_text(longer, done=2).startswith("rounds 3-5 of 5: 3 rounds of 4 episode")
    assert rounds_text(fed, done=2).startswith("nothing left to train")


# 2. the result table: each row's episodes


def test_the_result_table_shows_the_episodes_each_row_was_evaluated_on(said):
    print_result("speaker_listener: federated, mean return per agent", summary(PRIVATE))
    text = said()
    assert row(text, "trained")[-1] == "512" and row(text, "no_comm")[-1] == "64"
    assert row(text, "random")[-1] == "1,000" and row(text, "DP ceiling")[-1] == "1,000"
    assert "over 512 episodes" not in text


# 3. the learning curve's title: channel, aggregation, privacy


def test_the_curve_title_of_the_private_default_names_its_channel_and_aggregation():
    fed = fed_of()
    title = curve_title("speaker_listener", "federated", fed.train.team, PRIVATE,
                        server_text(fed))
    assert "4 codewords under randomized response, epsilon 5.33" in title
    assert "codeword kept w.p. 0.99" in title
    assert "DP at composed epsilon 8" in title and "sigma" not in title
    assert ("server aggregates (fedavg) encoder among 2 speakers; the private networks of 2 "
            "speakers") in title
    one = curve_title("speaker_listener", "federated", fed.train.team, PRIVATE,
                      server_text(fed_of("--sites", "1")))
    assert "server aggregates nothing" in one and "fedavg" not in one


def test_the_curve_title_of_the_non_private_run_names_its_gaussian_channel_and_fedavg():
    fed = fed_of("--non-private")
    title = curve_title("speaker_listener", "federated", fed.train.team, NON_PRIVATE,
                        server_text(fed))
    assert "Gaussian channel, sigma=0.5, clip 1" in title
    assert "server aggregates (fedavg) the whole shared module" in title
    assert "not private (no DP: epsilon inf)" in title
    assert server_text(fed_of("--env", "factory")) == "server aggregates nothing"


def test_the_learning_curve_png_carries_its_title_and_draws_a_one_round_run(tmp_path):
    fed = fed_of()
    title = curve_title("speaker_listener", "federated", fed.train.team, PRIVATE,
                        server_text(fed))
    path = tmp_path / "learning_curve.png"
    learning_curve([{"round": 1, "env_steps": 12_800, "return_mean": -30.0}],
                   summary(PRIVATE), path, title)
    assert Image.open(path).text["Title"] == title


# 4. the audit's confidence


def test_the_empirical_audit_prints_its_confidence_as_it_is():
    from fedcomm.commands.privacy import _judged

    assert (percent(0.999), percent(0.95), percent(0.9999)) == ("99.9%", "95%", "99.99%")
    found = CanaryAudit(6.0, 5.33, 100_000, 2000, 1999, 0.999)
    out = io.StringIO()
    problems = _judged(found, {"claimed_epsilon": 5.33, "releases_per_unit": 1,
                               "source": "ledgers"}, "randomized response", 100_000,
                       Console(file=out, width=400), "report:empirical")
    assert "99.9% lower bound 6.0000" in out.getvalue() and "100%" not in out.getvalue()
    assert "the 99.9% empirical lower bound" in problems[0][1]


# 5. epsilon inf: not private, no budget, no DP ceiling


def test_a_run_without_dp_says_it_is_not_private_and_has_no_dp_ceiling(said):
    text = privacy_text(NON_PRIVATE)
    assert "NOT PRIVATE" in text and "feedback and update released without noise" in text
    assert "no budget" in text and "within budget" not in text
    s = summary(NON_PRIVATE)
    assert not s.private
    assert "DP ceiling" not in gap_closed_text(s) and "channel ceiling" in gap_closed_text(s)
    print_result("t", s)
    text = said()
    assert "DP ceiling" not in text and row(text, "channel ceiling")[1] == "-7.700"
    assert "within budget" not in text


def test_a_private_run_keeps_its_budget_verdict_and_dp_ceiling():
    text = privacy_text(PRIVATE)
    assert "composed epsilon 8 of budget 8, within budget" in text
    assert "DP ceiling's gap" in gap_closed_text(summary(PRIVATE))
    uncapped = privacy_text({**PRIVATE, "budget": "inf", "composed": 6.45e5})
    assert "composed epsilon 6.45e+05, no budget" in uncapped
    assert "within budget" not in uncapped


# 6. a run that releases nothing


def test_a_run_that_releases_nothing_says_so():
    text = privacy_text(NOTHING)
    assert text.startswith("privacy: nothing released") and "each alone" not in text
    assert "releases nothing" in curve_title("factory", "centralized",
                                             TrainConfig().team, NOTHING, "one process")


# 7. the privacy report's charts


def ledger(path: Path, releases: list, rounds: int) -> Path:
    with Ledger(path, path.stem, config_hash({})) as book:
        for r in range(1, rounds + 1):
            for release in releases:
                book.append(release, round=r, batch=r, unit="episode")
    return path


def report_of(tmp_path: Path, rounds: int, noise: float = 3.0, budget: float = 8.0) -> dict:
    releases = [RandomizedResponse("message", 5.33, 4), gaussian_release("update", noise, 1.0)]
    ledgers = {"speaker": ledger(tmp_path / "speaker.jsonl", releases, rounds),
               "listener": ledger(tmp_path / "listener.jsonl", [], rounds)}
    run = RunInfo(config={}, delta=1e-5, budget=budget,
                  mechanisms={"message": {"kind": "randomized_response"}, "update": {}})
    return build_report(ledgers, run, tmp_path)


def test_the_page_draws_no_chart_for_an_agent_that_released_nothing(tmp_path):
    report = report_of(tmp_path, rounds=1)
    page = render_html(report, tmp_path / "privacy_report.html").read_text()
    assert page.count("data:image/png;base64,") == 1  # the speaker's
    listener = page[page.index("<h2>Agent listener</h2>"):page.index("<h2>Agent speaker</h2>")]
    assert "<img" not in listener and "released nothing" in listener
    assert "final hash <code>none (empty)</code>" in listener


def test_a_one_round_chart_draws_every_point_as_a_marker_on_a_round_axis(tmp_path):
    import matplotlib.pyplot as plt

    section = report_of(tmp_path, rounds=1)["agents"]["speaker"]
    fig, _ = epsilon_figure("speaker", section)
    ax = fig.axes[0]
    curves = [line for line in ax.get_lines() if len(line.get_xdata()) == 1]
    assert len(curves) == 3 and all(line.get_marker() == "o" for line in curves)
    assert list(ax.get_xticks()) == [1]
    left, right = ax.get_xlim()
    bottom, top = ax.get_ylim()
    composed = float(section["composed"]["epsilon"])
    assert left < 1 < right and right - left >= 1 and bottom == 0 and top > composed
    plt.close(fig)


def test_a_run_without_dp_or_budget_is_not_called_within_budget_on_the_page(tmp_path):
    report = report_of(tmp_path, rounds=2, noise=0.0, budget=math.inf)
    page = render_html(report, tmp_path / "privacy_report.html").read_text()
    assert "every agent is within its budget" not in page
    assert "Verdict: not private: no budget" in page
    report["run"]["utility"] = {"gap_closed": 0.5, "ceiling_gap_closed": 0.9, "of_ceiling": 0.6}
    page = render_html(report, tmp_path / "privacy_report.html").read_text()
    assert "DP ceiling" not in page and "the ceiling of this channel" in page


# 8. the accountant the docstrings name


def test_the_docstrings_name_pld_the_default_accountant():
    assert DEFAULT_ACCOUNTANT == "pld"
    assert "PLD (default)" in privacy_package.__doc__ and "RDP (default)" not in \
        privacy_package.__doc__
    assert "(the default)" not in rdp_module.__doc__.splitlines()[0]


# the commands as a user runs them


def run_command(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "fedcomm", *args], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "COLUMNS": "400"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


@pytest.mark.integration
def test_a_small_private_simulation_says_what_it_did(tmp_path):
    out = tmp_path / "run"
    log = run_command("simulate", "--num-envs", "16", "--env-steps", str(3 * 16 * 25),
                      "--batches-per-round", "2", "--eval-episodes", "24", "--hidden", "16",
                      "--quiet", "--out", str(out))
    assert "2 rounds of 2 episode batches per agent, the last of 1 (1,200 env steps)" in log
    done = json.loads((out / "summary.json").read_text())
    aggregated = ("server aggregates (fedavg) encoder among 2 speakers; the private networks "
                  "of 2 speakers (each type's among its own)")
    assert done["aggregated"] == aggregated
    # the agents evaluate whole batches of 16 episodes, the scripted teams at least 8,192
    # (their own sampling error would move every share of the gap)
    assert row(log, "trained")[-1] == str(done["final"]["episodes"]) == "32"
    scripted = done["baselines"]["ceiling"]["episodes"]
    assert row(log, "DP ceiling")[-1] == f"{scripted:,}" and scripted == BASELINE_EPISODES
    title = Image.open(out / "learning_curve.png").text["Title"]
    assert "randomized response" in title and aggregated in title
    assert "DP at composed epsilon" in title
    page = (out / "privacy_report.html").read_text()
    assert "Agent s0.listener_0 released nothing" in page
    assert "Agent s1.listener_0 released nothing" in page
    assert page.count("data:image/png;base64,") == 2  # the two speakers' charts
    audit = run_command("audit", str(out), "--empirical")
    assert "99.9% lower bound" in audit and "100%" not in audit
