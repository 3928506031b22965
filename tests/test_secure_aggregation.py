"""Secure aggregation and distributed client-level DP: the Skellam release and its accounting,
the agents' integer encoding through Flower's quantizer, the agent's check of the server's
SecAgg+ setup, and whole rounds of real ClientApps with Flower's ``secaggplus_mod`` and
``SecAggPlusWorkflow`` stages: what the server receives, dropouts, and the ledgers."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Error, Message, MessageType, RecordDict
from flwr.common import bytes_to_ndarray
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.common.secure_aggregation.quantization import quantize
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.supercore.task_identity import TaskIdentity

from fedcomm.clients.secure import STATE, answer_stage, keep_input
from fedcomm.commands import build_parser, federation_config_from_args, main
from fedcomm.commands.flags import FlagError
from fedcomm.privacy.accountants import make_accountant
from fedcomm.privacy.audit import audit
from fedcomm.privacy.budget import BudgetExhausted
from fedcomm.privacy.events import SkellamRelease, gaussian_release, merge
from fedcomm.privacy.ledger import Ledger, read_ledger, release_from_entry
from fedcomm.privacy.skellam import SkellamCodec, threshold_of
from fedcomm.protocol.secure import MAX_WEIGHT, MODULUS, ROUND
from fedcomm.releases.cohorts import codec, cohorts, noise_for_epsilon
from fedcomm.releases.report import write_client_level_report
from fedcomm.server.checkpoint import load_checkpoint
from fedcomm.server.layout import ReplyLayout, initial_arrays
from fedcomm.server.validation import ReplyScreen
from tests.harness.grids import B, FederatedRun, private_default
from tests.harness.processes import ROUND_STEPS, SMALL, deploy, simulate


@pytest.fixture(autouse=True, scope="module")
def server_identity():
    """Messages are made by a server task: the test plays the ServerApp's part."""
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID


# -- the release and its accounting ---------------------------------------------------------------
def test_the_skellam_bound_is_the_gaussians_plus_its_correction_at_integer_orders():
    r = SkellamRelease("client_update", variance=1e6, l2_sensitivity=2e3, l1_sensitivity=2e5,
                       count=3)
    a, mu, d2, d1 = 4, 1e6, 2e3, 2e5
    expected = 3 * (a * d2**2 / (2 * mu) + min(((2 * a - 1) * d2**2 + 6 * d1) / (4 * mu**2),
                                               3 * d1 / (2 * mu)))
    assert r.rdp(4) == pytest.approx(expected)
    assert r.rdp(4.5) == math.inf and r.rdp(1) == math.inf  # no bound proven there
    gaussian = gaussian_release("g", math.sqrt(mu) / (d2 / 2), d2 / 2, count=3)
    rdp = make_accountant("rdp")
    assert rdp.epsilon([r], 1e-5) >= rdp.epsilon([gaussian], 1e-5)  # the correction costs
    assert merge([r, r]) == [r.with_count(6)]
    assert rdp.epsilon([r.with_count(6)], 1e-5) == rdp.epsilon([r, r], 1e-5)


@pytest.mark.parametrize("name", ["pld", "prv", "exact"])
def test_only_the_rdp_accountant_composes_skellam_and_the_others_say_so(name: str):
    r = SkellamRelease("client_update", variance=1e6, l2_sensitivity=2e3, l1_sensitivity=2e5)
    with pytest.raises(ValueError, match=r"Skellam|Gaussian"):
        make_accountant(name).epsilon([r], 1e-5)


def test_a_skellam_release_goes_through_the_ledger_unchanged(tmp_path: Path):
    r = SkellamRelease("client_update", variance=123.5, l2_sensitivity=7.0, l1_sensitivity=70.0)
    with Ledger(tmp_path / "l.jsonl", "a", "c" * 64) as ledger:
        ledger.append(r, round=1, batch=1, unit="history")
    (entry,) = read_ledger(tmp_path / "l.jsonl")
    assert release_from_entry(entry) == r


# -- the agents' encoding ---------------------------------------------------------------------
def updates(n: int, dim: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(0, 0.02, dim) * rng.uniform(0.2, 3) for _ in range(n)]


def centred(x: np.ndarray, enc: SkellamCodec) -> np.ndarray:
    """One input alone in the update's units: its integer on Flower's grid, centred (an
    agent's clipped update, rounded, with its noise share, where that stays within the
    range)."""
    t = enc.target_range
    return (np.mod(x * enc.scale + t / 2 + t / 2, t) - t / 2) / enc.scale


@pytest.mark.parametrize(("agents", "noise"), [(3, 0.0), (8, 4.0), (128, 12.0)])
def test_encoded_inputs_pass_flowers_quantizer_unchanged_and_sum_exactly(agents, noise):
    """Every input is an integer point of Flower's quantization grid (its stochastic rounding
    rounds nothing), and the sum decodes to the sum of the clipped, rounded, noised updates,
    though single inputs wrap around the range."""
    dim = 500
    enc = SkellamCodec(clip=0.5, noise=noise, agents=agents, dim=dim)
    generator = torch.Generator().manual_seed(1)
    ups = updates(agents, dim)
    inputs = [enc.encode(u, generator) for u in ups]
    grid = quantize(inputs, enc.clipping_range, enc.target_range)
    for q, x in zip(grid, inputs, strict=True):
        np.testing.assert_array_equal(q.astype(np.float64), x * enc.scale + enc.target_range / 2)
    # SecAgg+'s arithmetic: the sum modulo 2^32, then Flower's dequantisation of the mean
    total = np.mod(sum(q.astype(np.int64) for q in grid), MODULUS)
    c = enc.clipping_range
    mean = (total * (2 * c / enc.target_range) - c - (agents - 1) * c) * (1 / agents)
    decoded = enc.decode(mean, agents)
    # each input alone, centred, is that agent's clipped update, rounded, with its noise share
    alone = [centred(x, enc) * enc.scale for x in inputs]
    np.testing.assert_array_equal(decoded * enc.scale, sum(alone))
    clipped = sum(u * min(1.0, 0.5 / np.linalg.norm(u)) for u in ups)
    error = np.linalg.norm(decoded - clipped)
    if noise == 0:
        assert error <= agents * math.sqrt(dim) / (2 * enc.scale)  # rounding alone
    else:  # the noise of the whole sum: every agent's share, `variance / (threshold - 1)`
        var = agents * enc.share / enc.scale**2
        assert 0.8 * math.sqrt(var * dim) < error < 1.2 * math.sqrt(var * dim)
    assert np.linalg.norm(decoded) <= enc.sum_bound(agents)


def test_an_update_is_clipped_to_the_norm_and_what_is_not_finite_counts_as_zero():
    """A coordinate that is not finite is a function of the agent's data like any other: it
    is encoded (as 0), not refused, so that nothing of it leaves outside the mechanism."""
    enc = SkellamCodec(clip=0.1, noise=0.0, agents=3, dim=4)
    x = enc.encode(np.array([3.0, 4.0, 0.0, 0.0]), torch.Generator())
    np.testing.assert_allclose(centred(x, enc), [0.06, 0.08, 0, 0], atol=1 / enc.scale)
    x = enc.encode(np.array([np.nan, np.inf, 0.03, 0.04]), torch.Generator())
    np.testing.assert_allclose(centred(x, enc), [0, 0, 0.03, 0.04], atol=1 / enc.scale)
    with pytest.raises(ValueError, match="4 coordinates, got 3"):
        enc.encode(np.zeros(3), torch.Generator())


def test_the_threshold_is_two_thirds_at_least_three_and_a_cohort_of_two_is_refused():
    assert [threshold_of(n) for n in (3, 4, 8, 32, 128)] == [3, 3, 6, 22, 86]
    with pytest.raises(ValueError, match="at least 3"):
        from fedcomm.releases.cohorts import check_cohorts
        check_cohorts(private_default("--sites", "2", "--secure-aggregation"))


# -- the agent checks the server's setup --------------------------------------------------------
def kept_state(fed, server_round: int = 3) -> Context:
    n = len(cohorts(fed)[0])
    enc = codec(fed, n, 10)
    state = RecordDict({STATE: ConfigRecord({
        "round": server_round, "agents": n, "threshold": enc.threshold,
        "clipping_range": enc.clipping_range, "target_range": enc.target_range,
        "input": np.zeros(10).tobytes()})})
    return Context(run_id=1, node_id=5, node_config={}, state=state, run_config={})


def setup_message(fed, server_round: int = 3, **change: object) -> Message:
    n = len(cohorts(fed)[0])
    enc = codec(fed, n, 10)
    config = {Key.STAGE: Stage.SETUP, Key.SAMPLE_NUMBER: n, Key.SHARE_NUMBER: n,
              Key.THRESHOLD: enc.threshold, Key.CLIPPING_RANGE: enc.clipping_range,
              Key.TARGET_RANGE: enc.target_range, Key.MOD_RANGE: MODULUS,
              Key.MAX_WEIGHT: MAX_WEIGHT, **change}
    return Message(RecordDict({RECORD_KEY_CONFIGS: ConfigRecord(config),
                               ROUND: ConfigRecord({"round": server_round})}),
                   dst_node_id=5, message_type=MessageType.TRAIN)


@pytest.mark.parametrize(("change", "says"), [
    ({Key.THRESHOLD: 3}, "threshold 3, this agent needs at least 4"),
    ({Key.SAMPLE_NUMBER: 9}, "sample_num"),
    ({Key.CLIPPING_RANGE: 64.0}, "clipping_range"),
    ({Key.TARGET_RANGE: 2**22}, "target_range"),
])
def test_an_agent_refuses_a_setup_with_less_than_its_noise_was_sized_for(change, says):
    fed = private_default("--sites", "5", "--secure-aggregation", "--client-dp-noise", "2")
    reply = answer_stage(setup_message(fed), kept_state(fed))
    assert set(reply.content.config_records[RECORD_KEY_CONFIGS]) == {Key.PUBLIC_KEY_1,
                                                                     Key.PUBLIC_KEY_2}
    with pytest.raises(ValueError, match=says):
        answer_stage(setup_message(fed, **change), kept_state(fed))
    with pytest.raises(ValueError, match="input is of round 3"):
        answer_stage(setup_message(fed, server_round=4), kept_state(fed))


def test_an_agent_answers_no_stage_of_a_round_whose_setup_it_did_not_check():
    fed = private_default("--sites", "5", "--secure-aggregation")
    context = kept_state(fed)
    share_keys = Message(RecordDict({
        RECORD_KEY_CONFIGS: ConfigRecord({Key.STAGE: Stage.SHARE_KEYS}),
        ROUND: ConfigRecord({"round": 3})}), dst_node_id=5, message_type=MessageType.TRAIN)
    with pytest.raises(ValueError, match="skips the setup"):
        answer_stage(share_keys, context)


# -- whole rounds -------------------------------------------------------------------------------
def secure_run(tmp_path: Path, sites: int, *flags: str) -> tuple[FederatedRun, object]:
    fed = private_default("--sites", str(sites), "--secure-aggregation", "--env-steps",
                          str(B * 25), *flags)  # one round
    return FederatedRun(fed, tmp_path / "run"), fed


def stage_of(msg: Message) -> str | None:
    record = msg.content.config_records.get(RECORD_KEY_CONFIGS)
    return None if record is None else record.get(Key.STAGE)


@pytest.mark.integration
def test_the_server_receives_masked_vectors_and_the_sum_and_nothing_of_one_update(
        tmp_path: Path):
    """Everything the ServerApp receives in a secure round with the agents' noise: the train
    replies carry no arrays; of each agent's input only a masked vector, uncorrelated with it;
    the unmasked sum equals the sum of the agents' clipped, noised updates (their inputs) to
    the float's last bit, and the new global module is the module sent plus its mean."""
    run, fed = secure_run(tmp_path, 4, "--client-dp-noise", "1", "--client-dp-clip", "0.5")
    inputs: dict[int, np.ndarray] = {}  # each agent's input, read from its own state as it is
    # asked to mask it (the node keeps no copy after)

    def reading(answer):
        def answered(node: int, msg: Message) -> Message | None:
            if stage_of(msg) == Stage.COLLECT_MASKED_VECTORS:
                kept = run.grid.contexts[node].state.config_records[STATE]
                inputs[node] = np.frombuffer(kept["input"], dtype=np.float64).copy()
            reply = answer(node, msg)
            if stage_of(msg) == Stage.COLLECT_MASKED_VECTORS:
                assert run.grid.contexts[node].state.config_records[STATE]["input"] == b""
            return reply
        return answered

    run.grid.answers = {node: reading(a) for node, a in run.grid.answers.items()}
    try:
        run.federation().run_rounds()
    finally:
        run.close()
    received = run.grid.replies
    staged = [m for m in received if RECORD_KEY_CONFIGS in m.content.config_records]
    train = [m for m in received if m not in staged and m.metadata.message_type == "train"]
    assert len(train) == fed.spec.n_agents
    assert all(not any(len(r) for r in m.content.array_records.values()) for m in train)
    (cohort,) = cohorts(fed)
    nodes = {i + 1: i for i in cohort}  # the harness's node i + 1 runs agent i
    start = initial_arrays(fed)
    keys = sorted(ReplyLayout.of(fed, start).agents[cohort[0]])
    enc = codec(fed, len(cohort), sum(start[k].numel() for k in keys))
    assert set(inputs) == set(nodes)
    masked = [m for m in staged
              if Key.MASKED_PARAMETERS in m.content.config_records[RECORD_KEY_CONFIGS]]
    assert {m.metadata.src_node_id for m in masked} == set(nodes)
    for m in masked:
        vector = bytes_to_ndarray(m.content.config_records[RECORD_KEY_CONFIGS]
                                  [Key.MASKED_PARAMETERS][1])  # [0] is the weight factor
        own = inputs[m.metadata.src_node_id] * enc.scale + enc.target_range / 2
        assert vector.shape == own.shape and not np.array_equal(vector, own)
        assert abs(np.corrcoef(vector.astype(np.float64), own)[0, 1]) < 0.05
    # every reply: no array (SecAgg+'s mod empties the input's records), keys and shares
    assert not any(len(r) for m in received for r in m.content.array_records.values())
    # the sum: the global module moved by the mean of the agents' inputs, decoded one by one
    alone = [centred(x, enc) for x in inputs.values()]
    mean = sum(alone) / len(alone)
    ckpt = load_checkpoint(tmp_path / "run")
    moved = np.concatenate([np.asarray(ckpt.arrays[k], dtype=np.float64).ravel()
                            - start[k].numpy().astype(np.float64).ravel() for k in keys])
    np.testing.assert_allclose(moved, mean, atol=1e-6)  # float32 of the module
    # each speaker charged its client-level ledger once, for the sum's noise at the threshold
    for i in cohort:
        (entry,) = read_ledger(tmp_path / "run" / "agents" / fed.spec.agent_ids[i]
                               / "client_level.jsonl")
        assert entry["variance"] == enc.variance and entry["unit"] == "history"


@pytest.mark.integration
@pytest.mark.parametrize("leaves", [Stage.UNMASK, Stage.COLLECT_MASKED_VECTORS,
                                    Stage.SHARE_KEYS])
def test_one_of_eight_leaving_the_round_completes_with_the_others_and_is_accounted(
        tmp_path: Path, leaves: str):
    """Eight speakers in one cohort (threshold 6); one node's process dies: after sending its
    masked input (its input is in the sum, its masks removed with the others' shares), before
    it (the sum of seven), or before it shared its secrets (in nobody's masks). The round
    completes, the agent is named, and every speaker's ledger holds the release its noise share
    was sized for (the threshold's), whatever left."""
    run, fed = secure_run(tmp_path, 8, "--client-dp-noise", "2",
                          "--on-agent-failure", "continue")
    leaver = 1 + cohorts(fed)[0][3]
    answer = run.grid.answers[leaver]

    def leaving(node: int, msg: Message) -> Message | None:
        if stage_of(msg) != leaves:
            return answer(node, msg)
        # its process gone: Flower answers with an error in its place
        return Message(Error(ErrorCode.NODE_UNAVAILABLE, f"node {node} left"), reply_to=msg)

    run.grid.answers[leaver] = leaving
    try:
        result = run.federation().run_rounds()
    finally:
        run.close()
    (row,) = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    name = fed.spec.agent_ids[leaver - 1]
    assert row["agents"] == 16 and result.summary.rounds == 1
    where = "in" if leaves == Stage.UNMASK else "not in"
    assert row["secure_left"] == [f"{name} ({where} the sum)"]
    report = write_client_level_report(tmp_path / "run", fed, {
        a: tmp_path / "run" / "agents" / a / "client_level.jsonl" for a in fed.spec.agent_ids})
    speakers = [fed.spec.agent_ids[i] for i in cohorts(fed)[0]]
    assert sorted(report["agents"]) == sorted(speakers)
    eps = {a: float(report["agents"][a]["composed"]["epsilon"]) for a in speakers}
    assert len(set(eps.values())) == 1 and 0 < eps[name] < math.inf
    assert audit(tmp_path / "run" / "client_dp_report.json", agents=speakers).ok


def test_the_noise_for_a_client_level_epsilon_meets_it_and_little_less_would_not():
    fed = private_default("--sites", "8", "--secure-aggregation", "--client-dp-clip", "0.5",
                          "--env-steps", str(10 * B * 25))  # ten rounds
    dims = [4420]
    noise = noise_for_epsilon(fed, 2.0, dims)
    rdp = make_accountant("rdp")

    def cost(sigma: float) -> float:
        trial = replace(fed, client_dp_noise=sigma)
        return rdp.epsilon([codec(trial, 8, 4420).release().with_count(fed.rounds)], 1e-5)

    assert fed.rounds == 10 and cost(noise) <= 2.0 < cost(noise * 0.995)
    flags = ["simulate", "--sites", "8", "--secure-aggregation", "--client-dp-epsilon", "2"]
    built = federation_config_from_args(build_parser().parse_args(flags))
    assert built.client_dp_noise > 0 and built.client_dp_epsilon == 2
    with pytest.raises(FlagError, match="not both"):
        federation_config_from_args(build_parser().parse_args(
            [*flags, "--client-dp-noise", "3"]))
    with pytest.raises(ValueError, match="under --secure-aggregation"):
        federation_config_from_args(build_parser().parse_args(
            ["simulate", "--sites", "8", "--client-dp-epsilon", "2"]))


def test_without_noise_an_agent_clips_at_what_an_honest_optimizer_reaches():
    fed = private_default("--sites", "3", "--secure-aggregation")
    reach = ReplyScreen(fed, ReplyLayout.of(fed, initial_arrays(fed)),
                        {a: "k" for a in fed.spec.agent_ids}).step_bound(fed.batches_per_round)
    assert codec(fed, 3, 100).clip == pytest.approx(reach * 10)
    noisy = replace(fed, client_dp_noise=1.0, client_dp_clip=0.3)
    assert codec(noisy, 3, 100).clip == 0.3


@pytest.mark.integration
@pytest.mark.parametrize("how", ["simulate", "deploy local"])
def test_a_secure_run_with_client_level_dp_sums_every_round_and_its_report_is_audited(
        tmp_path: Path, how: str):
    """The run as a user starts it: Flower's simulation engine (Ray actors serving the agents)
    or a deployment (SuperLink, SuperNodes, each agent's worker holding its SecAgg+ state).
    Every round's updates are summed by SecAgg+, each agent charged its client-level ledger,
    the run prints the client-level epsilon and ``fedcomm audit`` verifies both reports."""
    out = tmp_path / "run"
    flags = ["--secure-aggregation", "--client-dp-noise", "2", "--client-dp-clip", "0.5",
             "--env-steps", str(2 * ROUND_STEPS), "--out", str(out)]
    proc = deploy(*flags) if how == "deploy local" else simulate(*SMALL, *flags)
    log, _ = proc.communicate(timeout=400)
    assert proc.returncode == 0, log
    assert "client-level DP of the aggregated module" in log and "Traceback" not in log
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    assert all(r["secure_s"] > 0 and r["secure_bytes_received"] > 0 and not r["secure_left"]
               and r["failures"] == 0 for r in rows)
    for agent in ("sensor_0", "processor_0", "actuator_0"):  # one cohort: all send comm.*
        assert len(read_ledger(out / "agents" / agent / "client_level.jsonl")) == 2
    assert main(["audit", str(out)]) == 0


def test_an_agent_keeps_no_input_past_its_client_level_epsilon(tmp_path: Path):
    """Calibrated for the run's two rounds; a third input (a round run again) would pass the
    epsilon: refused before anything is charged or kept."""
    fed = federation_config_from_args(build_parser().parse_args([
        "simulate", "--sites", "3", "--secure-aggregation", "--client-dp-epsilon", "2",
        "--num-envs", str(B), "--env-steps", str(2 * B * 25), "--batches-per-round", "1"]))
    assert fed.rounds == 2
    (cohort,) = cohorts(fed)
    agent = fed.spec.agent_ids[cohort[0]]
    state = RecordDict()
    sent = {"type.speaker.w": torch.zeros(10)}
    for rnd in (1, 2):
        keep_input(fed, cohort[0], agent, tmp_path, state, rnd, sent,
                   {"type.speaker.w": torch.full((10,), 0.01)})
    with pytest.raises(BudgetExhausted, match="client-level participation"):
        keep_input(fed, cohort[0], agent, tmp_path, state, 3, sent,
                   {"type.speaker.w": torch.full((10,), 0.01)})
    assert len(read_ledger(tmp_path / "client_level.jsonl")) == 2
    assert state.config_records[STATE]["round"] == 2
