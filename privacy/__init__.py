"""Privacy accounting for fedcomm: releases, accountants, ledgers, budgets, reports, audits.

The pieces, in the order a release meets them:

* :mod:`.events`: :class:`GaussianRelease`, the unit of accounting;
* :mod:`.accountants`: PLD (default), RDP, PRV and the exact Gaussian composition;
* :mod:`.calibrate`: the smallest noise multiplier for a target epsilon;
* :mod:`.budget`: a budget checked before spending, and the per-agent odometer;
* :mod:`.ledger`: the write-ahead, hash-chained ledger each release is written to first;
* :mod:`.noise`: cryptographically seeded generators for the noise;
* :mod:`.report`, :mod:`.page`, :mod:`.audit`, :mod:`.canary`: the run's report, its page,
  its independent audit, and the empirical one-run canary audit.
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "accountants": ["Accountant", "make_accountant"],
    "audit": ["AuditFailure", "AuditResult", "audit"],
    "budget": ["BudgetExhausted", "PrivacyAccount", "PrivacyBudget", "Spent"],
    "calibrate": ["noise_for_epsilon"],
    "canary": ["CanaryAudit", "empirical_audit"],
    "events": ["GaussianRelease", "Relation", "gaussian_release"],
    "ledger": ["Ledger", "LedgerError", "LedgerLocked", "config_hash", "read_ledger",
               "verify_chain"],
    "noise": ["secure_generator"],
    "page": ["render_html"],
    "report": ["RunInfo", "build_report", "write_report"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}


def __getattr__(name: str) -> Any:
    # Imported on first use, so that a process that only writes a ledger does not load
    # torch, Opacus and dp-accounting.
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{_WHERE[name]}", __name__), name)
    # Loading a submodule binds its name here (``audit`` the module); the export wins.
    globals()[name] = value
    return value


__all__ = [
    "Accountant",
    "AuditFailure",
    "AuditResult",
    "BudgetExhausted",
    "CanaryAudit",
    "GaussianRelease",
    "Ledger",
    "LedgerError",
    "LedgerLocked",
    "PrivacyAccount",
    "PrivacyBudget",
    "Relation",
    "RunInfo",
    "Spent",
    "audit",
    "build_report",
    "config_hash",
    "empirical_audit",
    "gaussian_release",
    "make_accountant",
    "noise_for_epsilon",
    "read_ledger",
    "render_html",
    "secure_generator",
    "verify_chain",
    "write_report",
]
