"""The page a person reads: ``privacy_report.html``, rendered from a privacy report.

The markup lives in ``templates/report.html``, a set of :class:`string.Template` fragments, so
that the page's structure reads as HTML; this module supplies the words and the numbers. Every
value is HTML-escaped on its way into a fragment unless it is markup built from the fragments
(:class:`_Html`), so a value from the report (an agent's name, a ledger path) cannot inject
markup. The report itself is :mod:`fedcomm.privacy.report`'s.
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
from collections.abc import Iterable, Mapping
from importlib.resources import files
from pathlib import Path
from string import Template
from typing import Any

from .report import decode_eps

TEMPLATE = "templates/report.html"


def _load_fragments() -> dict[str, Template]:
    """The named fragments of :data:`TEMPLATE` (``<!-- fragment: name -->`` starts each)."""
    text = files(__package__).joinpath(TEMPLATE).read_text(encoding="utf-8")
    parts = re.split(r"^<!-- fragment: (\w+) -->\n", text, flags=re.MULTILINE)
    return {name: Template(body.strip("\n")) for name, body in zip(parts[1::2], parts[2::2])}


_FRAGMENTS = _load_fragments()


class _Html(str):
    """Markup built from the fragments: substituted as it is, where any other value is escaped."""


def _fill(fragment: str, **values: Any) -> _Html:
    """``fragment`` with ``values`` in place; ``KeyError`` if one it names is missing."""
    return _Html(_FRAGMENTS[fragment].substitute(
        {k: v if isinstance(v, _Html) else html.escape(str(v)) for k, v in values.items()}))


def _join(parts: Iterable[_Html], sep: str = "\n") -> _Html:
    return _Html(sep.join(parts))


_NOTHING = _Html("")

_UNIT_WORDS = {
    ("episode", "batch"): (
        "one episode of the agent's experience (its observations and actions in one episode). "
        "Every episode is used in one training batch, and every network that shapes a release "
        "(the sender's feature network, GRU and encoder for vectors; the receiver's networks "
        "for feedback) trains on it only under DP-SGD, or not at all (a run that gives DP-SGD "
        "no share: the networks of the agents that release stay what public data made "
        "them), so later releases depend on it only through DP-SGD's output: the releases "
        "that compose are those of its batch, the vectors, the feedback and the DP-SGD "
        "steps."),
    ("episode", "all"): (
        "one episode of the agent's experience (its observations and actions in one episode). "
        "The networks that shape the releases train on it without DP-SGD, so every later "
        "release can depend on it (a vector's mean can move anywhere in the clip ball): every "
        "release of the run composes, and the figure is that of all of them."),
    ("history", "batch"): "the agent's whole history: all its releases over the run compose.",
    ("history", "all"): "the agent's whole history: all its releases over the run compose.",
}
_RELATION_WORDS = {
    "replace_one": ("replace-one: the guarantee compares two histories that differ in one unit "
                    "replaced by any other; a clipped value can move by twice the clip norm."),
    "add_remove": ("add/remove: the guarantee compares two histories that differ by one unit "
                   "present or absent."),
}


def _assumptions(run: Mapping[str, Any]) -> list[str]:
    return [
        f"Privacy unit: {_UNIT_WORDS[run['unit'], run.get('composition', 'batch')]}",
        f"Neighbouring relation: {_RELATION_WORDS[run['relation']]} Mechanisms accounted "
        "under another relation alone (DP-SGD under add/remove, as Opacus does) are "
        "re-analysed under this one for the composed figure.",
        "Protected: the unit's data, against everyone who sees the released values: peers "
        "receiving message vectors and feedback, and the server, which sees only the "
        "shared module trained with DP-SGD. Each release was written to the agent's "
        "hash-chained ledger before it left the agent.",
        "Not covered: what a peer can infer through the shared environment itself (it acts "
        "in the same world and observes the agent's actions and their effects); the "
        "simulator, which sees the world state and keys every episode's randomness with its "
        "own secret; data that never passes through a recorded mechanism (listed below where "
        "an agent sent any to the server).",
        "The unit is the agent's whole history, so the guarantee covers all it contributes."
        if run["unit"] == "history" else
        "No guarantee beyond the unit: a person or agent behind many episodes is protected "
        "only through group privacy, which multiplies epsilon.",
        f"Accountant: {run['accountant']['name']}; every epsilon is at delta = {run['delta']:g}"
        f" and is an upper bound ({run['rounding']}).",
        *([("One budget split over the mechanisms, each calibrated to its epsilon alone: "
            + ", ".join(f"{k} {v:.3f}" for k, v in run["split"].items())
            + "; together they compose to at most the budget.")] if run.get("split") else []),
    ]


def _eps_text(value: Any) -> str:
    eps = decode_eps(value)
    return "∞" if eps == math.inf else f"{eps:.6f}"


def epsilon_figure(agent: str, section: Mapping[str, Any]) -> tuple[Any, list[str]]:
    """A figure of epsilon over rounds for one agent's report ``section``, and notes on what
    it leaves out; no figure (``None``) where nothing can be drawn (every point infinite).

    Infinite points cannot be drawn on a linear axis, so they are left out and named. Every
    point is a marker and the last of each curve is labelled with its value, so a run of one
    round reads as well as a long one.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    notes: list[str] = []

    def finite(name: str, curve: list[Mapping[str, Any]]) -> tuple[list[int], list[float], str]:
        points = [(p["round"], decode_eps(p["epsilon"])) for p in curve]
        shown = [(r, v) for r, v in points if v != math.inf]
        left_out = [r for r, v in points if v == math.inf]
        if not left_out:
            return [r for r, _ in shown], [v for _, v in shown], ""
        notes.append(f"{name}: epsilon is ∞ (a release without noise) from round "
                     f"{left_out[0]}; those {len(left_out)} point(s) are not plotted.")
        return [r for r, _ in shown], [v for _, v in shown], ", ∞ not plotted"

    comp = section["composed"]
    curves = [(name, mech["relation"], *finite(name, mech["epsilon_over_rounds"]))
              for name, mech in section["mechanisms"].items()]
    composed = ("composed", comp["relation"], *finite("composed", comp["epsilon_over_rounds"]))
    if not any(rounds for _, _, rounds, _, _ in (*curves, composed)):
        notes.append("No chart: every point is ∞.")
        return None, notes
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for name, relation, rounds, values, tail in (*curves, composed):
        if not rounds:  # every point infinite: named in the notes, nothing to draw
            continue
        style = ({"color": "black", "linewidth": 2, "markersize": 7} if name == "composed"
                 else {"markersize": 5})
        line, = ax.plot(rounds, values, marker="o", label=f"{name} ({relation}{tail})", **style)
        ax.annotate(f"{values[-1]:.3g}", (rounds[-1], values[-1]), xytext=(6, 0),
                        textcoords="offset points", va="center", fontsize="small",
                        color=line.get_color())
    budget = decode_eps(comp["budget"])
    if budget == math.inf:
        notes.append("No budget line: the budget is ∞ (no budget).")
    else:
        ax.axhline(budget, color="red", linestyle="--", label="budget")
    drawn = sorted({r for _, _, rounds, _, _ in (*curves, composed) for r in rounds})
    ax.set_xlim(drawn[0] - 0.5, drawn[-1] + max(0.5, 0.08 * (drawn[-1] - drawn[0])))
    ax.set_ylim(0, ax.get_ylim()[1] * 1.08)  # room above the budget line and the labels
    if len(drawn) <= 10:
        ax.set_xticks(drawn)  # every round a tick: a round is a whole number
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="round", ylabel="epsilon", title=f"agent {agent}")
    ax.legend(fontsize="small")
    fig.tight_layout()
    return fig, notes


def _plot(agent: str, section: Mapping[str, Any]) -> tuple[str | None, list[str]]:
    """PNG (base64) of :func:`epsilon_figure`, and its notes; no PNG where it has no figure."""
    import matplotlib.pyplot as plt

    fig, notes = epsilon_figure(agent, section)
    if fig is None:
        return None, notes
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode(), notes


def _parameters_text(p: Mapping[str, Any]) -> str:
    if p.get("kind") == "randomized_response":
        return f"randomized response eps={p['epsilon']:g} K={p['symbols']} x{p['count']}"
    if p.get("kind") == "skellam":
        return (f"Skellam variance={p['variance']:.4g} Delta2={p['l2_sensitivity']:.4g} "
                f"Delta1={p['l1_sensitivity']:.4g} x{p['count']}")
    return (f"sigma={p['noise_multiplier']:g} C={p['clip']:g} Delta={p['sensitivity']:g} "
            f"q={p['sample_rate']:g} x{p['count']}")


def _table(rows: list[list[Any]], header: list[str]) -> _Html:
    return _fill(
        "table", header=_join((_fill("header_cell", text=h) for h in header), ""),
        rows=_join(_fill("row", cells=_join((_fill("cell", text=c) for c in row), ""))
                   for row in rows))


def _unbounded(report: Mapping[str, Any]) -> _Html:
    """A warning naming agents with infinite epsilon: "within budget" alone would hide it."""
    agents = [a for a, s in report["agents"].items()
              if decode_eps(s["composed"]["epsilon"]) == math.inf]
    return _fill("unbounded", agents=", ".join(agents)) if agents else _NOTHING


def _silent(run: Mapping[str, Any]) -> _Html:
    """A warning naming agents that stayed silent: their budget refused those batches."""
    silent = run.get("silent_batches") or {}
    if not silent:
        return _NOTHING
    return _fill("silent", agents=", ".join(
        f"{a} in {n} training batches" for a, n in silent.items()))


RELEASE_WORDS = {
    "known": "a count or identity the server already knows",
    "ledger": "post-processing of the agent's ledger (public parameters and counts)",
    "dp": "post-processing of DP-SGD steps in the agent's ledger",
    "clear": "in the clear: no mechanism covers it",
}
"""How the server learns each kind of field an agent sends it (``run.released``)."""


def _released(run: Mapping[str, Any]) -> _Html:
    """What the agents sent the server besides their releases to peers, field by field."""
    released = run.get("released")
    if released is None:
        return _NOTHING
    rows = [[name, RELEASE_WORDS.get(kind, kind)] for name, kind in sorted(released.items())]
    clear = sorted(name for name, kind in released.items() if kind == "clear")
    note = (_fill("released_in_clear", fields=", ".join(clear)) if clear
            else _fill("released_covered"))
    aggregated = run.get("aggregated")
    return _fill("released", table=_table(rows, ["field", "how the server learns it"]),
                 note=note, aggregated=_fill("aggregated", text=aggregated) if aggregated
                 else _NOTHING)


def _utility(run: Mapping[str, Any], private: bool) -> _Html:
    """What the run's privacy left of its team's coordination: the gap closed, and against the
    ceiling (a scripted team through the same mechanism, schedule and budget): a DP ceiling
    only where the run is ``private``."""
    u = run.get("utility") or {}
    if u.get("gap_closed") is None:
        return _NOTHING
    text = f"The trained team closed {u['gap_closed']:.1%} of the no-communication -> oracle gap"
    if u.get("of_ceiling") is not None and u.get("ceiling_gap_closed") is not None:
        ceiling = ("the DP ceiling at these mechanisms" if private else
                   "the ceiling of this channel (a scripted team through it; no DP: the run "
                   "is not private)")
        text += (f"; {ceiling} closes {u['ceiling_gap_closed']:.1%}, "
                 f"and the team {u['of_ceiling']:.1%} of the no-communication -> ceiling gap")
    return _fill("utility", text=text)


def _agent(agent: str, section: Mapping[str, Any], delta: float) -> _Html:
    """One agent's chart (a line instead where it released nothing), table of mechanisms,
    budget and ledger."""
    comp, ledger = section["composed"], section["ledger"]
    if section["mechanisms"]:
        image, notes = _plot(agent, section)
        chart = _fill("chart", image=_Html(image)) if image is not None else _NOTHING
    else:
        notes, chart = [], _fill("no_chart", agent=agent)
    rows = [[name, m["relation"], m["sampling"], m["releases"], m["count"],
             "; ".join(_parameters_text(p) for p in m["parameters"]),
             _eps_text(m["epsilon"]) + (" (no noise: no guarantee)"
                                        if decode_eps(m["epsilon"]) == math.inf else "")]
            for name, m in section["mechanisms"].items()]
    rows.append(["composed", comp["relation"], "", "", "", "", _eps_text(comp["epsilon"])])
    if decode_eps(comp["budget"]) == math.inf:
        budget = f"No budget (∞), spent {_eps_text(comp['epsilon'])}, remaining ∞"
        status = ("not capped" if decode_eps(comp["epsilon"]) != math.inf
                  else "not capped, and no guarantee")
    else:
        budget = (f"Budget {_eps_text(comp['budget'])}, spent {_eps_text(comp['epsilon'])}, "
                  f"remaining {_eps_text(comp['remaining'])}")
        status = "within budget" if comp["within_budget"] else "OVER BUDGET"
    return _fill(
        "agent", agent=agent, chart=chart,
        notes=_fill("plot_notes", notes=" ".join(notes)) if notes else _NOTHING,
        table=_table(rows, ["mechanism", "relation", "sampling", "ledger entries", "releases",
                            "parameters", f"epsilon (delta={delta:g})"]),
        budget=budget, status=status,
        status_class="ok" if comp["within_budget"] and decode_eps(comp["epsilon"]) != math.inf
        else "bad",
        ledger_path=ledger["path"], entries=ledger["entries"],
        final_hash=ledger["final_hash"] or "none (empty)")


def _verdict(report: Mapping[str, Any]) -> tuple[str, str]:
    """The page's verdict and its class: over budget; within it; or, where no budget caps an
    agent, what holds instead: nothing released, no guarantee, or epsilon without a cap."""
    agents = report["agents"]
    if not report["verdict"]["within_budget"]:
        return "bad", f"over budget: {', '.join(report['verdict']['agents_over_budget'])}"
    if not any(s["mechanisms"] for s in agents.values()):
        return "ok", "nothing released: every agent's ledger is empty, no privacy spent"
    if any(decode_eps(s["budget"]["epsilon"]) != math.inf for s in agents.values()):
        return "ok", "every agent is within its budget"
    if any(decode_eps(s["composed"]["epsilon"]) == math.inf for s in agents.values()):
        return "bad", "not private: no budget, and no guarantee (epsilon ∞, below)"
    return "note", "no budget: nothing capped epsilon (each agent's figure is below)"


def render_html(report: Mapping[str, Any], path: Path | str) -> Path:
    """Write a self-contained HTML page for ``report``: verdict, assumptions, plots, tables."""
    run = report["run"]
    verdict_class, verdict = _verdict(report)
    private = all(decode_eps(s["composed"]["epsilon"]) != math.inf
                  for s in report["agents"].values())
    page = _fill(
        "page", verdict_class=verdict_class, verdict=verdict,
        unbounded=_unbounded(report), schema=report["schema"], created=report["created"],
        config_hash=run["config_hash"], silent=_silent(run), utility=_utility(run, private),
        released=_released(run),
        assumptions=_join(_fill("assumption", text=text) for text in _assumptions(run)),
        agents=_join(_agent(agent, section, run["delta"])
                     for agent, section in report["agents"].items()))
    path = Path(path)
    # An absent optional section leaves an empty line in the template: drop it.
    path.write_text("\n".join(line for line in page.split("\n") if line.strip()) + "\n",
                    encoding="utf-8")
    return path
