"""Report and audit: a report built from ledgers passes; any edit fails and is named.

Infinite epsilons and budgets (a release without noise, an agent without a cap) are stated as
``"inf"`` and get the same guarantees.
"""

import html
import json
import math
import re
from pathlib import Path

import pytest

from fedcomm.privacy.audit import audit, independent_epsilon
from fedcomm.privacy.budget import PrivacyAccount, PrivacyBudget, remaining_budget
from fedcomm.privacy.events import gaussian_release
from fedcomm.privacy.ledger import Ledger, config_hash, entry_hash
from fedcomm.privacy.page import render_html
from fedcomm.privacy.report import (
    REPORT_NAME,
    SCHEMA,
    RunInfo,
    build_report,
    decode_eps,
    encode_eps,
    run_info_from_report,
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


def edit_ledger_line(path: Path, index: int, **fields: object) -> list[str]:
    """Overwrite ``fields`` of the ledger's line ``index`` (0-based) in place, hashes left as
    they were; returns the lines as they were before."""
    original = path.read_text().splitlines(keepends=True)
    entry = {**json.loads(original[index]), **fields}
    path.write_text("".join([*original[:index], json.dumps(entry) + "\n",
                             *original[index + 1:]]))
    return original


def test_edited_ledger_line_is_named(tmp_path):
    make_run(tmp_path)
    path = tmp_path / "ledgers" / "a0.jsonl"
    original = edit_ledger_line(path, 2, noise_multiplier=0.5)  # less noise than configured
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


def test_the_independent_audit_composes_every_randomized_response_a_ledger_counts() -> None:
    """A ledger entry of count 2 is two releases: twice the pure epsilon of one at this delta.
    dp-accounting's PLDAccountant (0.6) composes such an event once whatever its count, which
    let an under-claimed discrete-channel run pass the audit."""
    one = {"kind": "randomized_response", "mechanism": "message", "epsilon": 2.7,
           "symbols": 9, "count": 1}
    single = independent_epsilon([one], "replace_one", 1e-5)
    assert single == pytest.approx(2.7, rel=1e-3)
    assert independent_epsilon([{**one, "count": 2}], "replace_one", 1e-5) == pytest.approx(
        2 * single, rel=1e-3)
    assert independent_epsilon([one, one], "replace_one", 1e-5) == pytest.approx(
        independent_epsilon([{**one, "count": 2}], "replace_one", 1e-5))


# --- infinity: a release without noise, an agent without a budget -----------------------------

INF_CONFIG = {"env": "platoon", "feedback": "no DP"}
INF_MECHANISMS = {"message": {"noise_multiplier": 0.5, "clip": 1.0},
                  "feedback": {"noise_multiplier": 0.0, "clip": 1e6}}


def strict_load(path):
    def refuse(constant):
        raise AssertionError(f"non-strict JSON constant {constant}")
    return json.loads(path.read_text(), parse_constant=refuse)


def make_inf_run(tmp_path, budget=math.inf, rounds=3):
    """Spent through PrivacyAccount as a run does; feedback (noise 0) from round 1 on."""
    path = tmp_path / "a.jsonl"
    account = PrivacyAccount(PrivacyBudget(budget, 1e-5), "episode", "a")
    with Ledger(path, "a", config_hash(INF_CONFIG)) as ledger:
        for r in range(rounds):
            releases = [gaussian_release("message", 0.5, 1.0, count=25)]
            if r > 0:
                releases.append(gaussian_release("feedback", 0.0, 1e6))
            if budget == math.inf:
                account.spend(ledger, releases, round=r, batch=r)
            else:  # the filter would refuse: record as a run that overspent would have
                for release in releases:
                    ledger.append(release, round=r, batch=r, unit="episode")
    run = RunInfo(config=INF_CONFIG, delta=1e-5, budget=budget, mechanisms=INF_MECHANISMS)
    report = build_report({"a": path}, run, tmp_path)
    write_report(report, tmp_path)
    return report


def test_infinite_epsilon_report_writes_renders_and_audits(tmp_path):
    report = make_inf_run(tmp_path)
    assert strict_load(tmp_path / REPORT_NAME) == report  # what was built is what is read
    agent = report["agents"]["a"]
    composed, feedback = agent["composed"], agent["mechanisms"]["feedback"]
    assert agent["budget"]["epsilon"] == "inf"
    assert (composed["epsilon"], composed["budget"], composed["remaining"]) == ("inf",) * 3
    assert composed["within_budget"] is True and report["verdict"]["within_budget"] is True
    assert [p["epsilon"] for p in composed["epsilon_over_rounds"]][1:] == ["inf", "inf"]
    assert isinstance(composed["epsilon_over_rounds"][0]["epsilon"], float)  # before feedback
    assert feedback["epsilon"] == "inf"
    assert isinstance(agent["mechanisms"]["message"]["epsilon"], float)

    result = audit(tmp_path)
    assert result.ok, result.failures
    assert result.independent["a"]["composed"] == math.inf
    assert result.independent["a"]["feedback"] == math.inf
    assert math.isfinite(result.independent["a"]["message"])

    page = render_html(report, tmp_path / "privacy_report.html").read_text()
    assert "∞" in page and "No budget (∞)" in page and "not plotted" in page
    text = re.sub(r"<img[^>]*>", "", page)  # base64 holds any letters
    assert "nan" not in text.lower() and "inf<" not in text

    info = run_info_from_report(report)  # round trip: the same report again
    assert info.budget_for("a") == math.inf
    again = build_report({"a": tmp_path / "a.jsonl"}, info, tmp_path)
    assert again["agents"] == report["agents"] and again["run"] == report["run"]


def test_infinite_epsilon_over_a_finite_budget(tmp_path):
    report = make_inf_run(tmp_path, budget=400.0)
    composed = report["agents"]["a"]["composed"]
    assert (composed["epsilon"], composed["remaining"], composed["within_budget"]) == \
        ("inf", 0.0, False)
    assert report["verdict"] == {"within_budget": False, "agents_over_budget": ["a"]}
    result = audit(tmp_path)
    assert [(f.where, f.message) for f in result.failures] == [
        ("privacy_report.json:agents.a.composed.epsilon", "inf exceeds the budget 400.0")]
    page = render_html(report, tmp_path / "privacy_report.html").read_text()
    assert "OVER BUDGET" in page and "remaining 0.000000" in page


def test_page_states_every_section_in_order_and_escapes_every_value(tmp_path):
    """The page (``fedcomm.privacy.page`` filling ``templates/report.html``) with every optional
    section; a value from the report reaches it escaped, never as markup."""
    report = make_run(tmp_path, "episode")
    report["run"].update(
        split={"message": 1.25, "<i>feedback</i>": 2.5}, silent_batches={"b<1>": 3},
        utility={"gap_closed": 0.8123, "ceiling_gap_closed": 0.9, "of_ceiling": 0.7},
        released={"steps": "known", "<b>loss</b>": "clear", "grads": "dp"})
    report["schema"] += "<s>"
    report["run"]["config_hash"] = "<h>"
    report["agents"]["a0"]["ledger"]["path"] = "<p>.jsonl"
    report["verdict"] = {"within_budget": False, "agents_over_budget": ["<z>"]}
    page = render_html(report, tmp_path / "privacy_report.html").read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and page.count("data:image/png;base64,") == 2
    text = re.sub(r"<img[^>]*>", "", page)  # base64 holds any letters
    for raw in ("<s>", "<h>", "<p>.jsonl", "<z>", "<b>loss</b>", "<i>feedback</i>", "b<1>"):
        assert raw not in text and html.escape(raw) in text
    sections = [
        "<p class='bad'><b>Verdict: over budget: &lt;z&gt;</b></p>", "Schema fedcomm.",
        "<p class='bad'>Silent (the budget refused their releases, so they released nothing "
        "and did not train): b&lt;1&gt; in 3 training batches</p>",
        "The trained team closed 81.2% of the no-communication -&gt; oracle gap; the DP "
        "ceiling at these mechanisms closes 90.0%, and the team 70.0%",
        "<h2>What the agents sent the server</h2>",
        "<p class='bad'>Sent in the clear, outside every figure above: &lt;b&gt;loss&lt;/b&gt;.",
        "<h2>Assumptions</h2>", "<li>Not covered:", "<li>One budget split", "<h2>Agent a0</h2>",
        "<code>&lt;p&gt;.jsonl</code>, 12 entries", "<h2>Agent b&lt;1&gt;</h2>",
        "<span class='ok'>within budget</span>. Ledger <code>ledgers/b1.jsonl</code>", "</html>"]
    positions = [text.index(s) for s in sections]
    assert positions == sorted(positions)
    assert text.count("<table>") == 3 and text.count("<th>epsilon (delta=1e-05)</th>") == 2
    assert "$" not in text and "\n\n" not in page  # every placeholder filled, no empty line

    report["run"].update(released={"steps": "known"}, utility={"gap_closed": 0.5})
    page = render_html(report, tmp_path / "privacy_report.html").read_text(encoding="utf-8")
    assert "<p>Every field sent to the server is a count, post-processing of the ledger or a " \
        "DP release: nothing outside the figures above.</p>" in page
    assert "oracle gap.</p>" in page and "Sent in the clear" not in page


@pytest.mark.parametrize(("change", "where"), [
    # a finite number where the recomputation gives inf: an under-claim, and named
    (lambda r: r["agents"]["a"]["mechanisms"].__setitem__(
        "feedback", {**r["agents"]["a"]["mechanisms"]["feedback"], "epsilon": 1.0}),
     "agents.a.mechanisms.feedback.epsilon"),
    (lambda r: r["agents"]["a"]["composed"].__setitem__("epsilon", 1e308),
     "agents.a.composed.epsilon"),
    (lambda r: r["agents"]["a"]["composed"].__setitem__("remaining", 5.0),
     "agents.a.composed.remaining"),
    (lambda r: r["agents"]["a"]["composed"]["epsilon_over_rounds"][2].__setitem__(
        "epsilon", "Infinity"), "agents.a.composed.epsilon_over_rounds[2].epsilon"),
    # "inf" where a number was: an over-claim, still not what the ledger gives
    (lambda r: r["agents"]["a"]["mechanisms"]["message"].__setitem__("epsilon", "inf"),
     "agents.a.mechanisms.message.epsilon"),
    (lambda r: r["agents"]["a"]["mechanisms"]["message"]["epsilon_over_rounds"][0].__setitem__(
        "epsilon", 1.0), "agents.a.mechanisms.message.epsilon_over_rounds[0].epsilon"),
    # a smaller budget: the composed section no longer matches and inf exceeds it
    (lambda r: r["agents"]["a"]["budget"].__setitem__("epsilon", 10.0),
     "agents.a.composed.budget"),
])
def test_edits_of_an_infinite_report_are_named(tmp_path, change, where):
    make_inf_run(tmp_path)
    edit_report(tmp_path, change)
    result = audit(tmp_path)
    assert f"privacy_report.json:{where}" in wheres(result), result.failures


def test_feedback_claim_below_infinity_is_an_under_claim(tmp_path):
    make_inf_run(tmp_path)
    edit_report(tmp_path, lambda r: r["agents"]["a"]["mechanisms"]["feedback"].__setitem__(
        "epsilon", 1e6))
    failures = [f for f in audit(tmp_path).failures
                if f.where == "privacy_report.json:agents.a.mechanisms.feedback.epsilon"]
    assert any("under-claim" in f.message for f in failures)


def test_non_strict_json_is_refused(tmp_path):
    make_inf_run(tmp_path)
    path = tmp_path / REPORT_NAME
    path.write_text(path.read_text().replace('"inf"', "Infinity"))
    result = audit(tmp_path)
    assert not result.ok and "Infinity is not JSON" in result.failures[0].message


def test_write_report_encodes_inf_and_refuses_nan(tmp_path):
    path = write_report({"a": [1.0, math.inf], "b": {"c": 2}}, tmp_path / "r.json")
    assert strict_load(path) == {"a": [1.0, "inf"], "b": {"c": 2}}
    with pytest.raises(ValueError, match=r"report\.b\.c"):
        write_report({"b": {"c": math.nan}}, tmp_path / "r.json")
    with pytest.raises(ValueError):
        write_report({"b": -math.inf}, tmp_path / "r.json")
    assert [decode_eps(v) for v in (encode_eps(math.inf), encode_eps(2.5), 3)] == \
        [math.inf, 2.5, 3.0]
    for bad in ("Infinity", "nan", None, True, math.nan):
        with pytest.raises(ValueError):
            decode_eps(bad)


def test_spent_with_an_infinite_budget_has_infinite_remaining():
    account = PrivacyAccount(PrivacyBudget(math.inf, 1e-5))
    account.record([gaussian_release("feedback", 0.0, 1.0)], batch=0)
    spent = account.spent()
    assert (spent.composed, spent.remaining) == (math.inf, math.inf)
    assert remaining_budget(10.0, math.inf) == 0.0
