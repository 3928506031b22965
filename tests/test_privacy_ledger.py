"""Write-ahead ledger: chain, tampering, crash, torn line, single writer."""

import json
import signal
import subprocess
import sys
import textwrap

import pytest

from fedcomm.privacy.budget import PrivacyAccount, PrivacyBudget
from fedcomm.privacy.events import gaussian_release
from fedcomm.privacy.ledger import (
    FIELDS,
    GENESIS,
    Ledger,
    LedgerError,
    LedgerLocked,
    config_hash,
    entry_hash,
    read_ledger,
    verify_chain,
)

CONFIG = config_hash({"run": "test"})
MESSAGE = gaussian_release("message", 1.5, 1.0)


def write(path, n=4):
    with Ledger(path, "a0", CONFIG) as ledger:
        for i in range(n):
            ledger.append(MESSAGE, round=i, batch=i, unit="episode")
    return path.read_text().splitlines(keepends=True)


def test_append_read_verify(tmp_path):
    path = tmp_path / "sub" / "a0.jsonl"
    with Ledger(path, "a0", CONFIG) as ledger:
        entry = ledger.append(MESSAGE, round=0, batch=3, unit="episode")
        assert len(ledger) == 1 and ledger.last_hash == entry["hash"]
    assert set(entry) == set(FIELDS)
    assert entry["seq"] == 1 and entry["prev"] == GENESIS and entry["hash"] == entry_hash(entry)
    assert entry["sensitivity"] == 2.0 and entry["relation"] == "replace_one"
    assert read_ledger(path) == [entry]
    line = path.read_text()
    assert line == json.dumps(entry, sort_keys=True, separators=(",", ":")) + "\n"
    # Reopening continues the chain.
    with Ledger(path, "a0", CONFIG) as ledger:
        second = ledger.append(MESSAGE, round=1, batch=4, unit="episode")
    assert second["seq"] == 2 and second["prev"] == entry["hash"]
    assert verify_chain(read_ledger(path)) == []
    with pytest.raises(ValueError, match="unit"), Ledger(path, "a0", CONFIG) as ledger:
        ledger.append(MESSAGE, round=0, batch=0, unit="step")


def tampered(path, lines):
    path.write_text("".join(lines))
    return verify_chain(read_ledger(path))


def test_edited_field_is_named(tmp_path):
    lines = write(tmp_path / "l.jsonl")
    entry = json.loads(lines[1])
    entry["noise_multiplier"] = 3.0
    lines[1] = json.dumps(entry) + "\n"
    problems = tampered(tmp_path / "l.jsonl", lines)
    assert problems == ["line 2: hash does not match the entry (a field was edited)"]
    # Re-hashing the edited entry moves the break to the next line's prev.
    entry["hash"] = entry_hash(entry)
    lines[1] = json.dumps(entry) + "\n"
    assert [p.split(":")[0] for p in tampered(tmp_path / "l.jsonl", lines)] == ["line 3"]


def test_deleted_inserted_reordered_lines_are_named(tmp_path):
    path = tmp_path / "l.jsonl"
    lines = write(path)
    deleted = tampered(path, [lines[0], *lines[2:]])
    assert deleted and all(p.startswith("line 2:") for p in deleted[:2])
    inserted = tampered(path, [*lines[:2], lines[0], *lines[2:]])
    assert inserted[0].startswith("line 3:") and "seq is 1, expected 3" in inserted[0]
    reordered = tampered(path, [lines[0], lines[2], lines[1], lines[3]])
    assert {p.split(":")[0] for p in reordered} == {"line 2", "line 3", "line 4"}
    with pytest.raises(LedgerError, match="broken hash chain"):
        Ledger(path, "a0", CONFIG)


def test_wrong_agent_or_config_is_refused(tmp_path):
    path = tmp_path / "l.jsonl"
    write(path, 1)
    with pytest.raises(LedgerError, match="agent"):
        Ledger(path, "a1", CONFIG)
    with pytest.raises(LedgerError, match="config"):
        Ledger(path, "a0", config_hash({"run": "other"}))


@pytest.mark.integration  # a Python process
def test_second_writer_is_refused(tmp_path):
    path = tmp_path / "l.jsonl"
    first = Ledger(path, "a0", CONFIG)
    with pytest.raises(LedgerLocked, match="another writer"):
        Ledger(path, "a0", CONFIG)
    script = f"from fedcomm.privacy.ledger import Ledger; Ledger({str(path)!r}, 'a0', {CONFIG!r})"
    other = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert other.returncode != 0 and "LedgerLocked" in other.stderr
    first.close()
    Ledger(path, "a0", CONFIG).close()


@pytest.mark.integration  # a Python process
def test_crash_right_after_append_still_counts(tmp_path):
    path = tmp_path / "l.jsonl"
    script = textwrap.dedent(f"""
        import os, signal
        from fedcomm.privacy.events import gaussian_release
        from fedcomm.privacy.ledger import Ledger
        ledger = Ledger({str(path)!r}, "a0", {CONFIG!r})
        ledger.append(gaussian_release("message", 1.5, 1.0), round=0, batch=0, unit="episode")
        os.kill(os.getpid(), signal.SIGKILL)  # before the release would be sent
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    with Ledger(path, "a0", CONFIG) as ledger:  # the killed writer's lock is gone
        assert len(ledger) == 1 and ledger.recovered is None
        budget = PrivacyBudget(100.0, 1e-5, "exact")
        account = PrivacyAccount.from_ledger(ledger.entries, budget, "episode", "a0")
    assert account.spent().composed == budget.epsilon_of([MESSAGE]) > 0


def test_torn_partial_line_is_truncated(tmp_path):
    path = tmp_path / "l.jsonl"
    lines = write(path, 2)
    path.write_text("".join(lines) + lines[0][:25])  # a crash in the middle of a write
    with pytest.raises(LedgerError, match=r"l.jsonl:3: torn last line"):
        read_ledger(path)
    with Ledger(path, "a0", CONFIG) as ledger:
        assert "line 3: removed a torn partial line" in ledger.recovered
        assert len(ledger) == 2
        assert ledger.append(MESSAGE, round=2, batch=2, unit="episode")["seq"] == 3
    assert verify_chain(read_ledger(path)) == []


def test_complete_entry_without_newline_is_kept(tmp_path):
    path = tmp_path / "l.jsonl"
    lines = write(path, 3)
    path.write_text("".join(lines).rstrip("\n"))
    with Ledger(path, "a0", CONFIG) as ledger:
        assert "line 3: added the missing newline" in ledger.recovered
        assert len(ledger) == 3
    assert path.read_text() == "".join(lines)
