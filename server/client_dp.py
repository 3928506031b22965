"""Client-level differential privacy on the server: each agent's whole contribution to the
global module bounded and noised, with its own ledgers and report.

The mechanism is Flower's ``DifferentialPrivacyServerSideFixedClipping``: every agent's update
(its shared module minus the global module it was sent) is clipped to L2 norm ``C``
(``client_dp_clip``), the clipped modules are averaged with equal weights, and Gaussian noise of
std ``sigma C / m`` (``client_dp_noise`` sigma, m contributing agents) is added to the mean.
That is the release of a sum of clipped updates with noise ``sigma C``, of sensitivity ``2C``
when one agent's whole participation is replaced by another's (the unit ``history``, relation
``replace_one``): one :class:`~fedcomm.privacy.events.GaussianRelease` of mechanism
``client_update`` per round, for every agent of the run.

Of Flower's wrapper this keeps the configuration, the clipping (``compute_clip_model_update``)
and the std (``compute_stdv``); its aggregation step is redone here because it divides by a
zero update norm, pairs a reply's arrays with the global module's by position, takes the number
of agents as fixed (m changes when an agent fails or stays silent) and draws its noise from
NumPy's global generator (here: :func:`~fedcomm.privacy.noise.secure_generator`).
Flower's ``DifferentialPrivacyClientSideFixedClipping`` needs each agent to clip its own update
(its ``fixedclipping_mod``), which is agent code; the server-side clip needs nothing of them.

The ledgers are the server's: ``server/client_dp/<agent>.jsonl`` in the run directory, written
before the round's aggregate exists (write-ahead: a round run again is counted twice, never
zero times). The report, ``client_dp_report.json``, has the schema of ``privacy_report.json``
and passes the same audit (``fedcomm.privacy.audit.audit``).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping
from flwr.supercore.differential_privacy import compute_clip_model_update, compute_stdv, get_norm
from rich.console import Console

from fedcomm.config import FederationConfig
from fedcomm.privacy.events import gaussian_release
from fedcomm.privacy.ledger import Ledger, config_hash
from fedcomm.privacy.noise import secure_generator
from fedcomm.protocol.round import ARRAYS
from fedcomm.releases.report import CLIENT_LEVEL_REPORT

MECHANISM = "client_update"
LEDGERS = Path("server") / "client_dp"
REPORT = CLIENT_LEVEL_REPORT


def ledger_paths(run_dir: str | Path, fed: FederationConfig) -> dict[str, Path]:
    return {a: Path(run_dir) / LEDGERS / f"{a}.jsonl" for a in fed.spec.agent_ids}


class ClientLevelDP(DifferentialPrivacyServerSideFixedClipping):
    """Flower's server-side fixed clipping around a grouped strategy, accounted per agent.

    Parameters
    ----------
    strategy
        The strategy whose mean is released (a ``GroupedFedAvg`` with its reply screen).
    fed
        The run: ``client_dp_noise``, ``client_dp_clip`` and its agents.
    run_dir
        Where the ledgers are.
    seed
        A fixed noise stream (tests only); ``None`` seeds from the operating system.
    """

    def __init__(self, strategy: Any, fed: FederationConfig, run_dir: str | Path,
                 seed: int | None = None) -> None:
        super().__init__(strategy, fed.client_dp_noise, fed.client_dp_clip, fed.spec.n_agents)
        self.fed, self.run_dir = fed, Path(run_dir)
        self.generator = secure_generator(seed)
        self.release = gaussian_release(MECHANISM, fed.client_dp_noise, fed.client_dp_clip,
                                        relation="replace_one")

    @property
    def screen(self) -> Any:
        return self.strategy.screen

    @property
    def held(self) -> list[str]:
        return self.strategy.held

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Clip every accepted update, charge every agent's ledger, then release the noised
        mean (``None`` if no agent contributed: nothing is released)."""
        screened = self.screen.screen(server_round, replies)
        contributing = [m for m in screened.accepted if len(m.content[ARRAYS])]
        if not contributing:
            return None, None
        current = {k: v.numpy() for k, v in self.current_arrays.items()}
        for msg in contributing:
            record = msg.content[ARRAYS]
            values = record.to_numpy_ndarrays()
            base = [current[k] for k in record]
            if get_norm([v - b for v, b in zip(values, base, strict=True)]) > 0:
                compute_clip_model_update(values, base, self.clipping_norm)
            msg.content[ARRAYS] = ArrayRecord(
                {k: Array(np.asarray(v)) for k, v in zip(record.keys(), values, strict=True)})
        self.num_sampled_clients = len(contributing)
        self._charge(server_round)
        arrays, metrics = self.strategy.aggregate_accepted(server_round, contributing)
        if arrays is not None:
            arrays = self._add_noise_to_aggregated_arrays(arrays)
        return arrays, metrics

    def _charge(self, server_round: int) -> None:
        digest = config_hash(self.fed.to_dict())
        for agent, path in ledger_paths(self.run_dir, self.fed).items():
            with Ledger(path, agent, digest) as ledger:
                ledger.append(self.release, round=server_round, batch=server_round,
                              unit="history")

    def _add_noise_to_aggregated_arrays(self, aggregated_arrays: ArrayRecord) -> ArrayRecord:
        std = compute_stdv(self.noise_multiplier, self.clipping_norm, self.num_sampled_clients)
        out = {}
        for key, value in aggregated_arrays.items():
            array = value.numpy()
            noise = torch.normal(0.0, std, array.shape, generator=self.generator,
                                 dtype=torch.float64).numpy()
            out[key] = Array(np.asarray(array + noise.astype(array.dtype)))
        return ArrayRecord(out)


def write_report(run_dir: str | Path, fed: FederationConfig) -> dict[str, Any]:
    """``client_dp_report.json`` (and ``.html``) from the server's ledgers: each agent's
    client-level epsilon at the run's delta, by its accountant."""
    from fedcomm.releases.report import write_client_level_report

    return write_client_level_report(Path(run_dir), fed, ledger_paths(run_dir, fed))


def epsilon_of(report: dict[str, Any]) -> float:
    """The largest client-level epsilon over agents."""
    return max((float(a["composed"]["epsilon"]) for a in report["agents"].values()),
               default=0.0)


def report(run_dir: str | Path, fed: FederationConfig, console: Console) -> None:
    """Write the report and say its figure."""
    delta = fed.train.privacy.delta
    console.print(f"client-level DP of the shared module: epsilon "
                  f"{epsilon_of(write_report(run_dir, fed)):.4g} at delta {delta:g} per agent's "
                  f"whole participation ({REPORT})", highlight=False)
