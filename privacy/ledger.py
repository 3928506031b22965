"""Per-agent, append-only, write-ahead ledger of releases.

One JSON object per line, each with :data:`COMMON_FIELDS` and its kind's :data:`KIND_FIELDS`
(``kind`` names it, absent for a Gaussian release). ``prev`` is the ``hash`` of
the line before (:data:`GENESIS` for the first) and ``hash`` is the SHA-256 of the canonical
JSON (sorted keys, no spaces) of the entry without ``hash``. Editing, deleting, inserting or
reordering lines breaks the chain at the line concerned (:func:`verify_chain`); deleting the
*last* lines leaves a valid shorter chain, which is why reports record each ledger's entry
count and final hash.

Write-ahead: :meth:`Ledger.append` writes the line, flushes and ``fsync``\\ s it (and the
directory when the file is created) before it returns, and callers release only after it
returns. A crash between the two over-counts a release, never under-counts one.

Restart: opening an existing ledger verifies its chain and continues it. A crash during
``append`` can leave a final line without its newline. That line was never acknowledged, so no
release followed it:

* if it is a complete entry (a JSON object with every field), the newline is added and it is
  kept (counting it is safe), then verified with the rest of the chain;
* otherwise the fragment is truncated.

Either repair is logged and recorded in :attr:`Ledger.recovered`; a damaged line that is not
the last one is never repaired: opening fails with :class:`LedgerError`.

Concurrency: one writer per ledger. :class:`Ledger` takes an exclusive ``fcntl.flock`` on the
file and refuses a second writer (another process, or a second ``Ledger`` on the same file in
this process) with :class:`LedgerLocked`. The lock goes with the process, also when it is
killed. Readers (:func:`read_ledger`) take no lock. Appends from several threads of the
owning process are serialised.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, get_args

from fedcomm.files import fsync_dir, open_private, private_dir

from .events import GaussianRelease, RandomizedResponse, Release, SkellamRelease

log = logging.getLogger(__name__)

Unit = Literal["episode", "history"]
UNITS: tuple[str, ...] = get_args(Unit)
Composition = Literal["batch", "all"]
COMPOSITIONS: tuple[str, ...] = get_args(Composition)
"""Which releases compose for an episode: ``"batch"``, those of the one batch that used it
(every network that shapes a release trains on it only under DP-SGD, so later releases are
post-processing); ``"all"``, every release (a network that shapes releases trains on it
without DP, so every later release can depend on it)."""


def composes_every_release(unit: Unit, composition: Composition) -> bool:
    """Whether all of an agent's releases compose for one unit (the unit ``history``, or an
    episode whose networks train without DP), rather than only those of its batch."""
    if composition not in COMPOSITIONS:
        raise ValueError(f"composition must be one of {COMPOSITIONS}, got {composition!r}")
    return not (unit == "episode" and composition == "batch")


def group_key(unit: Unit, composition: Composition, batch: int) -> int | None:
    """The group of releases that compose with a release of ``batch``: its batch, or ``None``
    for all of an agent's releases (``composes_every_release``)."""
    return None if composes_every_release(unit, composition) else batch
GENESIS = "0" * 64
COMMON_FIELDS: tuple[str, ...] = (
    "seq", "time", "agent", "round", "batch", "mechanism", "unit", "relation", "count",
    "noise", "config_hash", "prev", "hash",
)
NOISE_SOURCES: tuple[str, ...] = ("secure", "seeded")
"""Where an entry's randomness came from: the agent's secure source, or a seeded stream
(test randomness, which a peer who knows the seed reproduces: no guarantee holds)."""
KIND_FIELDS: dict[str, tuple[str, ...]] = {
    "gaussian": ("noise_multiplier", "clip", "sensitivity", "sample_rate"),
    "randomized_response": ("epsilon", "symbols"),
    "skellam": ("variance", "l2_sensitivity", "l1_sensitivity"),
}
"""The parameters of each kind of release; an entry without ``kind`` is Gaussian."""
FIELDS: tuple[str, ...] = COMMON_FIELDS + KIND_FIELDS["gaussian"]


def kind_of(entry: Mapping[str, Any]) -> str:
    return entry.get("kind", "gaussian")


def missing_fields(entry: Mapping[str, Any]) -> list[str]:
    """The fields an entry of its kind must have and lacks."""
    kind = kind_of(entry)
    if kind not in KIND_FIELDS:
        return [f"kind {kind!r} (unknown)"]
    return [f for f in COMMON_FIELDS + KIND_FIELDS[kind] if f not in entry]


class LedgerError(Exception):
    """A ledger is damaged, or does not belong to the agent or run opening it."""


class LedgerLocked(LedgerError):
    """Another writer holds the ledger."""


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys, no spaces, ASCII only and no NaN: the form that is hashed."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False)


def config_hash(config: Mapping[str, Any]) -> str:
    """SHA-256 of the canonical JSON of a run configuration."""
    return hashlib.sha256(canonical_json(config).encode()).hexdigest()


def entry_hash(entry: Mapping[str, Any]) -> str:
    """SHA-256 of the canonical JSON of ``entry`` without its ``hash`` field."""
    body = {k: v for k, v in entry.items() if k != "hash"}
    return hashlib.sha256(canonical_json(body).encode()).hexdigest()


def release_from_entry(entry: Mapping[str, Any]) -> Release:
    """The release a ledger entry records (``ValueError`` if its parameters are invalid)."""
    if kind_of(entry) == "randomized_response":
        return RandomizedResponse(mechanism=entry["mechanism"], epsilon=entry["epsilon"],
                                  symbols=entry["symbols"], count=entry["count"],
                                  relation=entry["relation"])
    if kind_of(entry) == "skellam":
        return SkellamRelease(mechanism=entry["mechanism"], variance=entry["variance"],
                              l2_sensitivity=entry["l2_sensitivity"],
                              l1_sensitivity=entry["l1_sensitivity"], count=entry["count"],
                              relation=entry["relation"])
    if kind_of(entry) != "gaussian":
        raise ValueError(f"unknown kind of release {kind_of(entry)!r}")
    return GaussianRelease(
        mechanism=entry["mechanism"], noise_multiplier=entry["noise_multiplier"],
        clip=entry["clip"], sensitivity=entry["sensitivity"], sample_rate=entry["sample_rate"],
        count=entry["count"], relation=entry["relation"])


def release_parameters(release: Release) -> dict[str, Any]:
    """What an entry records of a release besides its mechanism, relation and count."""
    if isinstance(release, RandomizedResponse):
        return {"kind": "randomized_response", "epsilon": float(release.epsilon),
                "symbols": release.symbols}
    if isinstance(release, SkellamRelease):
        return {"kind": "skellam", "variance": float(release.variance),
                "l2_sensitivity": float(release.l2_sensitivity),
                "l1_sensitivity": float(release.l1_sensitivity)}
    return {"noise_multiplier": float(release.noise_multiplier), "clip": float(release.clip),
            "sensitivity": float(release.sensitivity),
            "sample_rate": float(release.sample_rate)}


def _parse_lines(data: bytes, path: Path | str) -> list[dict[str, Any]]:
    entries = []
    for number, line in enumerate(data.split(b"\n")[:-1], 1):
        try:
            entry = json.loads(line)
        except ValueError as exc:
            raise LedgerError(f"{path}:{number}: not a JSON line ({exc})") from None
        if not isinstance(entry, dict):
            raise LedgerError(f"{path}:{number}: not a JSON object")
        entries.append(entry)
    return entries


def read_ledger(path: Path | str) -> list[dict[str, Any]]:
    """All entries of the ledger at ``path``, in file order, without verifying them.

    Raises :class:`LedgerError` naming the line if a line is not a JSON object, or if the
    file ends in a torn line (opening it with :class:`Ledger` repairs that).
    """
    data = Path(path).read_bytes()
    if data and not data.endswith(b"\n"):
        number = data.count(b"\n") + 1
        raise LedgerError(f"{path}:{number}: torn last line (no newline)")
    return _parse_lines(data, path)


def verify_chain(entries: Sequence[Mapping[str, Any]], genesis: str = GENESIS) -> list[str]:
    """Problems with the hash chain of ``entries``, each naming its line; empty if intact."""
    problems = []
    prev = genesis
    for number, entry in enumerate(entries, 1):
        missing = missing_fields(entry)
        if missing:
            problems.append(f"line {number}: missing fields {missing}")
        elif entry_hash(entry) != entry["hash"]:
            problems.append(f"line {number}: hash does not match the entry (a field was edited)")
        if entry.get("seq") != number:
            problems.append(f"line {number}: seq is {entry.get('seq')!r}, expected {number} "
                            "(a line was deleted, inserted or moved)")
        if entry.get("prev") != prev:
            before = "the genesis value" if number == 1 else f"the hash of line {number - 1}"
            problems.append(f"line {number}: prev is not {before} "
                            "(a line was deleted, inserted or moved)")
        prev = entry.get("hash")
    return problems


class Ledger:
    """The write-ahead ledger of one agent's releases (see the module docstring).

    Parameters
    ----------
    path
        The JSON-lines file; created with its parent directories if missing.
    agent
        The agent it belongs to; an existing ledger of another agent is refused.
    config_hash
        Hash of the run configuration (:func:`config_hash`); an existing ledger written under
        another configuration is refused.
    noise
        Where the randomness of the releases comes from (:data:`NOISE_SOURCES`), stated in
        every entry.
    """

    def __init__(self, path: Path | str, agent: str, config_hash: str,
                 noise: str = "secure") -> None:
        if noise not in NOISE_SOURCES:
            raise ValueError(f"noise must be one of {NOISE_SOURCES}, got {noise!r}")
        self.path, self.agent, self.config_hash = Path(path), agent, config_hash
        self.noise = noise
        self.recovered: str | None = None
        self._lock = threading.Lock()
        self._broken = False
        private_dir(self.path.parent)  # the agent's own: 0700
        created = not self.path.exists()
        # 0600, and a link planted at the path is refused (ELOOP), never written through.
        self._fd = open_private(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND)
        try:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise LedgerLocked(f"{self.path}: another writer holds this ledger") from None
            if created:
                fsync_dir(self.path.parent)
            self._entries = self._load()
        except BaseException:
            os.close(self._fd)
            raise

    @property
    def entries(self) -> list[dict[str, Any]]:
        """The entries written so far (a copy)."""
        return [dict(e) for e in self._entries]

    @property
    def last_hash(self) -> str:
        """Hash of the last entry, or :data:`GENESIS` when empty."""
        return self._entries[-1]["hash"] if self._entries else GENESIS

    def __len__(self) -> int:
        return len(self._entries)

    def append(self, release: Release, *, round: int, batch: int, unit: Unit) -> dict:
        """Record ``release`` durably; release the values only after this returns.

        Returns the entry written. Raises :class:`LedgerError` if a previous write failed
        half-way (the file is then in an unknown state until reopened).
        """
        if unit not in UNITS:
            raise ValueError(f"unit must be one of {UNITS}, got {unit!r}")
        for name, value in (("round", round), ("batch", batch)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        with self._lock:
            if self._broken or self._fd < 0:
                raise LedgerError(f"{self.path}: ledger is closed or a write failed; reopen it")
            entry: dict[str, Any] = {
                "seq": len(self._entries) + 1, "time": time.time(), "agent": self.agent,
                "round": round, "batch": batch, "mechanism": release.mechanism, "unit": unit,
                "relation": release.relation, **release_parameters(release),
                "count": release.count, "noise": self.noise, "config_hash": self.config_hash,
                "prev": self.last_hash,
            }
            entry["hash"] = entry_hash(entry)
            data = (canonical_json(entry) + "\n").encode()
            try:
                while data:
                    data = data[os.write(self._fd, data):]
                os.fsync(self._fd)
            except BaseException:
                self._broken = True
                raise
            self._entries.append(entry)
            return dict(entry)

    def close(self) -> None:
        """Release the lock and the file."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _load(self) -> list[dict[str, Any]]:
        data = self.path.read_bytes()
        entries = _parse_lines(data, self.path)
        if data and not data.endswith(b"\n"):
            self._repair_tail(data, entries)
            data = self.path.read_bytes()
            entries = _parse_lines(data, self.path)
        problems = verify_chain(entries)
        if problems:
            raise LedgerError(f"{self.path}: broken hash chain: " + "; ".join(problems))
        for number, entry in enumerate(entries, 1):
            if entry["agent"] != self.agent:
                raise LedgerError(f"{self.path}:{number}: written by agent {entry['agent']!r}, "
                                  f"not {self.agent!r}")
            if entry["config_hash"] != self.config_hash:
                raise LedgerError(f"{self.path}:{number}: written under config "
                                  f"{entry['config_hash']}, not {self.config_hash}")
        return entries

    def _repair_tail(self, data: bytes, entries: list[dict[str, Any]]) -> None:
        cut = data.rfind(b"\n") + 1
        number = len(entries) + 1
        tail = data[cut:]
        try:
            entry = json.loads(tail)
        except ValueError:
            entry = None
        if isinstance(entry, dict) and not missing_fields(entry):
            os.write(self._fd, b"\n")
            self.recovered = (f"line {number}: added the missing newline to a complete entry "
                              "(kept: counting it over-counts at most)")
        else:
            os.ftruncate(self._fd, cut)
            self.recovered = (f"line {number}: removed a torn partial line of {len(tail)} bytes "
                              "(append never returned, so it was never released)")
        os.fsync(self._fd)
        log.warning("%s: %s", self.path, self.recovered)
