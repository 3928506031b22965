"""An agent's side of secure aggregation: its update as a masked input, and Flower's SecAgg+.

After a round's training the agent does not reply with its arrays: it encodes its update (its
module minus the global one it was sent) with its cohort's ``SkellamCodec`` (clipped to
``client_dp_clip``, with its share of Skellam noise where the run has ``client_dp_noise``),
charges its client-level ledger for it (write-ahead: before the input exists), and keeps the
input in its node's context state. The server then runs SecAgg+'s four stages with the
cohort's nodes; each stage message goes through Flower's ``secaggplus_mod`` as shipped (flwr
1.42.0), which, in its third stage, masks the kept input with the agent's private mask and its
pairwise masks.

Before SecAgg+ begins, the agent checks the setup the server proposes against its own: the
reconstruction threshold its noise share was sized for, its cohort's size, and the ranges its
input was encoded for. A server that asks for less is refused (privacy fails closed), as are
stages of a round whose setup it did not check and a second masking of the same input (two
sums that differ by one input would tell it). Under ``client_dp_epsilon`` an agent whose next
input would pass that epsilon keeps none (a round run again is charged again).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.compat.common.recorddict_compat import fitres_to_recorddict

from fedcomm.config import FederationConfig
from fedcomm.privacy.budget import PrivacyBudget
from fedcomm.privacy.events import SkellamRelease
from fedcomm.privacy.ledger import Ledger, config_hash, release_from_entry
from fedcomm.privacy.noise import secure_generator
from fedcomm.protocol.secure import MAX_WEIGHT, MODULUS, ROUND
from fedcomm.releases.cohorts import codec, cohort_of

STATE = "fedcomm.secure"  # the kept input, in the node's context state
LEDGER = "client_level.jsonl"  # the agent's client-level ledger, in its state directory


def is_stage(content: RecordDict) -> bool:
    """Whether a train message is a stage of secure aggregation."""
    return RECORD_KEY_CONFIGS in content.config_records


def flat(arrays: Mapping[str, torch.Tensor]) -> np.ndarray:
    """The arrays as one vector, keys in sorted order (the server's order)."""
    return np.concatenate([arrays[k].detach().cpu().numpy().astype(np.float64).ravel()
                           for k in sorted(arrays)])


def keep_input(fed: FederationConfig, index: int, agent_id: str, state_dir: Path,
               context_state: RecordDict, server_round: int,
               sent: Mapping[str, torch.Tensor], trained: Mapping[str, torch.Tensor]
               ) -> None:
    """Encode the agent's update of ``server_round`` (``trained`` minus ``sent``, over the
    arrays it sends) and keep it for SecAgg+; its release is in the ledger first."""
    cohort = cohort_of(fed, index)
    update = flat(trained) - flat({k: sent[k] for k in trained})
    encoding = codec(fed, len(cohort), update.size)
    release = encoding.release()
    if release is not None:
        with Ledger(state_dir / LEDGER, agent_id, config_hash(fed.to_dict())) as ledger:
            _check_budget(fed, ledger, release)
            ledger.append(release, round=server_round, batch=server_round, unit="history")
    vector = encoding.encode(update, secure_generator())
    context_state[STATE] = ConfigRecord({
        "round": server_round, "agents": len(cohort), "threshold": encoding.threshold,
        "clipping_range": encoding.clipping_range, "target_range": encoding.target_range,
        "input": vector.tobytes()})


def _check_budget(fed: FederationConfig, ledger: Ledger, release: SkellamRelease) -> None:
    """Refuse an input past ``client_dp_epsilon`` (a round run again is charged again):
    ``BudgetExhausted``, and the agent keeps no input."""
    if fed.client_dp_epsilon is not None:
        budget = PrivacyBudget(fed.client_dp_epsilon, fed.train.privacy.delta, "rdp")
        budget.check([release_from_entry(e) for e in ledger.entries], [release],
                     who=f"{ledger.agent}'s client-level participation")


def answer_stage(msg: Message, context: Context) -> Message:
    """One SecAgg+ stage, through Flower's ``secaggplus_mod``, once the setup is checked: the
    stages of one round's input, from its setup, and that input masked once."""
    kept = context.state.config_records.get(STATE)
    if kept is None:
        raise ValueError("asked for secure aggregation without a kept input: this agent "
                         "trained no round under it")
    configs = msg.content.config_records[RECORD_KEY_CONFIGS]
    server_round, stage = _round(msg.content), configs.get(Key.STAGE)
    if stage == Stage.SETUP:
        _check_setup(configs, kept, server_round)
        kept["setup"] = server_round
    elif kept.get("setup") != server_round:
        raise ValueError(f"the server skips the setup of round {server_round}'s secure "
                         "aggregation")
    if stage == Stage.COLLECT_MASKED_VECTORS:
        if kept.get("masked"):
            raise ValueError(f"this agent's input of round {server_round} was masked and sent "
                             "once already; it is not sent into a second sum")
        kept["masked"] = True
        reply = secaggplus_mod(msg, context, _give_input(kept))
        kept["input"] = b""  # sent: the node keeps no copy of it
        return reply
    return secaggplus_mod(msg, context, _give_input(kept))


def _round(content: RecordDict) -> int:
    record = content.config_records.get(ROUND)
    if record is None or "round" not in record:
        raise ValueError(f"a secure aggregation stage carries no {ROUND!r} record")
    return int(record["round"])


def _check_setup(configs: ConfigRecord, kept: ConfigRecord, server_round: int) -> None:
    """Refuse a setup that would unmask a sum with less noise than the input was sized for,
    or that does not match the input's encoding."""
    if int(kept["round"]) != server_round:
        raise ValueError(f"the server asks to sum round {server_round}; this agent's input is "
                         f"of round {kept['round']}")
    wanted = {Key.THRESHOLD: ("at least", int(kept["threshold"])),
              Key.SAMPLE_NUMBER: ("at most", int(kept["agents"])),
              Key.CLIPPING_RANGE: ("exactly", float(kept["clipping_range"])),
              Key.TARGET_RANGE: ("exactly", int(kept["target_range"])),
              Key.MOD_RANGE: ("exactly", MODULUS), Key.MAX_WEIGHT: ("exactly", MAX_WEIGHT)}
    for key, (how, value) in wanted.items():
        got = configs.get(key)
        ok = (got is not None and ((how == "at least" and got >= value)
                                   or (how == "at most" and got <= value)
                                   or (how == "exactly" and math.isclose(got, value,
                                                                         rel_tol=0))))
        if not ok:
            raise ValueError(f"refused the server's SecAgg+ setup: {key} {got!r}, this agent "
                             f"needs {how} {value!r}")


def _give_input(kept: ConfigRecord) -> Callable[[Message, Context], Message]:
    """What ``secaggplus_mod`` asks of the app in its third stage: the input, as a fit result
    of weight ``MAX_WEIGHT`` (Flower's legacy layout, which the mod reads)."""

    def call_next(msg: Message, _: Context) -> Message:
        if _round(msg.content) != int(kept["round"]):
            raise ValueError("the server asks for another round's input")
        vector = np.frombuffer(kept["input"], dtype=np.float64)
        res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([vector]), int(MAX_WEIGHT), {})
        return Message(fitres_to_recorddict(res, keep_input=False), reply_to=msg)

    return call_next
