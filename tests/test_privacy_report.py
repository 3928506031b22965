"""Report and audit: a report built from ledgers passes; any edit fails and is named."""

import json

import pytest

from fedcomm.privacy.audit import audit, independent_epsilon
from fedcomm.privacy.events import gaussian_release
from fedcomm.privacy.ledger import Ledger, config_hash, entry_hash
from fedcomm.privacy.report import (
    REPORT_NAME,
    SCHEMA,
    RunInfo,
    build_report,
    render_html,
    write_report,
)

CONFIG = {"env": "platoon", "comm": {"clip": 1.0, "noise_multiplier": [1.0, 2.0]}}
MECHANISMS = {
    "message": {"noise_multiplier": [1.0, 2.0], "clip": 1.0, "relation": "replace_one"},
    "feedback": {"noise_multiplier": 3.0, "clip": 0.5},
    "dpsgd": {"noise_multiplier": 1.1, "clip": 1.0, "sample_rate": 0.05,
              "relation": "add_remove"},
}
AGENTS = {"a0": "a0.jsonl", "b<1>": "b1.jsonl"}


def batch(round_: int) -> list:
    sigma = 1.0 if round_ < 2 else 2.0  # a noise schedule: heterogeneous releases
    return [gaussian_release("message", sigma, 1.0, count=4),
            gaussian_release("feedback", 3.0, 0.5),
            gaussian_release("dpsgd", 1.1, 1.0, relation="add_remove", sample_rate=0.05,
                             count=10)]


def make_run(tmp_path, unit="episode", accountant="rdp", rounds=4, budget=60.0):
    (tmp_path / "ledgers").mkdir()
    paths = {}
    for agent, name in AGENTS.items():
        path = paths[agent] = tmp_path / "ledgers" / name
        with Ledger(path, agent, config_hash(CONFIG)) as ledger:
            for r in range(rounds):
                for release in batch(r):
                    ledger.append(release, round=r, batch=r, unit=unit)
    run = RunInfo(config=CONFIG, delta=1e-5, budget=budget, mechanisms=MECHANISMS,
                  accountant=accountant, unit=unit)
    report = build_report(paths, run, tmp_path)
    write_report(report, tmp_path / REPORT_NAME)
    return report


def edit_report(tmp_path, change):
    path = tmp_path / REPORT_NAME
    report = json.loads(path.read_text())
    change(report)
    path.write_text(json.dumps(report))


def wheres(result):
    return [f.where for f in result.failures]


@pytest.mark.parametrize("unit", ["episode", "history"])
def test_report_contents_and_clean_audit(tmp_path, unit):
    report = make_run(tmp_path, unit)
    assert report["schema"] == SCHEMA
    agent = report["agents"]["a0"]
    assert agent["ledger"] == {"path": "ledgers/a0.jsonl", "entries": 12,
                               "final_hash": agent["ledger"]["final_hash"]}
    message, dpsgd = agent["mechanisms"]["message"], agent["mechanisms"]["dpsgd"]
    assert (message["relation"], message["sampling"], message["count"]) == \
        ("replace_one", "none", 16)
    assert (dpsgd["relation"], dpsgd["sampling"]) == ("add_remove", "poisson")
    assert [p["noise_multiplier"] for p in message["parameters"]] == [1.0, 2.0]
    composed = agent["composed"]
    curve = [p["epsilon"] for p in composed["epsilon_over_rounds"]]
    assert [p["round"] for p in composed["epsilon_over_rounds"]] == [0, 1, 2, 3]
    assert curve == sorted(curve) and curve[-1] == composed["epsilon"]
    if unit == "episode":  # every batch is its own composition; the first is the noisiest
        assert curve[0] == curve[-1]
    else:
        assert curve[0] < curve[-1]
    assert composed["epsilon"] >= max(m["epsilon"] for m in agent["mechanisms"].values())
    assert composed["remaining"] == pytest.approx(60.0 - composed["epsilon"], abs=1e-6)
    assert report["verdict"] == {"within_budget": True, "agents_over_budget": []}

    result = audit(tmp_path)  # the run folder
    assert result.ok, result.failures
    independent = result.independent["a0"]["composed"]
    assert independent <= composed["epsilon"]  # RDP claims at least the tight PLD value

    page = render_html(report, tmp_path / "privacy_report.html").read_text()
    assert "data:image/png;base64," in page and "b&lt;1&gt;" in page and "b<1>" not in page
    assert "Not covered" in page and "Verdict" in page


def test_over_budget_verdict(tmp_path):
    report = make_run(tmp_path, "history", budget=5.0)
    assert report["verdict"] == {"within_budget": False, "agents_over_budget": ["a0", "b<1>"]}
    result = audit(tmp_path / REPORT_NAME)
    assert "privacy_report.json:agents.a0.composed.epsilon" in wheres(result)


def test_edited_epsilon_in_report_is_named(tmp_path):
    make_run(tmp_path)

    def lower(report):
        report["agents"]["a0"]["composed"]["epsilon"] = 1.0
        curve = report["agents"]["b<1>"]["mechanisms"]["message"]["epsilon_over_rounds"]
        curve[1]["epsilon"] *= 1.01

    edit_report(tmp_path, lower)
    result = audit(tmp_path)
    assert not result.ok
    found = wheres(result)
    assert found.count("privacy_report.json:agents.a0.composed.epsilon") == 2
    assert any("under-claim" in f.message for f in result.failures)
    assert ("privacy_report.json:agents.b<1>.mechanisms.message.epsilon_over_rounds[1].epsilon"
            in found)


def test_edited_ledger_line_is_named(tmp_path):
    make_run(tmp_path)
    path = tmp_path / "ledgers" / "a0.jsonl"
    original = path.read_text().splitlines(keepends=True)
    entry = json.loads(original[2])
    entry["noise_multiplier"] = 0.5  # less noise than was configured
    path.write_text("".join([*original[:2], json.dumps(entry) + "\n", *original[3:]]))
    result = audit(tmp_path)
    found = wheres(result)
    assert "ledgers/a0.jsonl:3" in found  # broken hash
    assert "ledgers/a0.jsonl:3:noise_multiplier" in found  # and not the declared value
    assert "privacy_report.json:agents.a0.ledger.final_hash" not in found
    # Dropping the last line leaves a valid chain, but not the one the report states.
    path.write_text("".join(original[:-1]))
    found = wheres(audit(tmp_path))
    assert not any(w.startswith("ledgers/") for w in found)
    assert "privacy_report.json:agents.a0.ledger.entries" in found
    assert "privacy_report.json:agents.a0.ledger.final_hash" in found


def test_entry_outside_the_config_is_named(tmp_path):
    make_run(tmp_path)
    path = tmp_path / "ledgers" / "a0.jsonl"
    lines = path.read_text().splitlines()
    entry = json.loads(lines[-1])
    entry.update(relation="replace_one", sensitivity=1.0)  # DP-SGD: undeclared relation
    entry["hash"] = entry_hash(entry)
    lines[-1] = json.dumps(entry)
    path.write_text("\n".join(lines) + "\n")
    found = wheres(audit(tmp_path))
    assert f"ledgers/a0.jsonl:{len(lines)}:relation" in found
    assert f"ledgers/a0.jsonl:{len(lines)}:sensitivity" in found


def test_config_and_verdict_edits_are_named(tmp_path):
    make_run(tmp_path)

    def change(report):
        report["run"]["config"]["env"] = "factory"
        report["verdict"]["within_budget"] = False

    edit_report(tmp_path, change)
    found = wheres(audit(tmp_path))
    assert "privacy_report.json:run.config_hash" in found
    assert "privacy_report.json:verdict" in found


def test_pld_report_and_independent_value(tmp_path):
    report = make_run(tmp_path, "episode", accountant="pld", rounds=2)
    result = audit(tmp_path)
    assert result.ok, result.failures
    claimed = report["agents"]["a0"]["composed"]["epsilon"]
    assert result.independent["a0"]["composed"] == pytest.approx(claimed, rel=1e-2)
    # The independent value is a composition of raw entries, checked here on one batch.
    entries = [json.loads(line) for line in
               (tmp_path / "ledgers" / "a0.jsonl").read_text().splitlines()[:3]]
    assert independent_epsilon(entries, "replace_one", 1e-5) == pytest.approx(claimed, rel=1e-2)
