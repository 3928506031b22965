"""The simulator's message checks as plain functions, without gRPC: every way a message can break
the protocol is refused with its status and a message naming what is wrong, and valid messages
come back decoded. The round's own refusals (a second join, a join for another round, a second
feedback) are checked the same way.

``tests/test_sim_joins.py``, ``test_sim_steps.py`` and ``test_sim_feedback.py`` send such
violations over the wire and check what each party then sees; here every rejection path is one
direct call, fast enough to cover them all.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import grpc
import pytest
import torch
from google.protobuf.message import Message

from fedcomm.protocol.codec import ProtocolError, encode
from fedcomm.protocol.v1 import joint_env_pb2 as pb
from fedcomm.sim.base import AgentType, EnvSpec
from fedcomm.sim.rounds import Phase, Round, round_to_join
from fedcomm.sim.validation import (
    Terms,
    check_action,
    check_dp,
    check_feedback,
    check_header,
    check_join_seq,
    check_round_number,
    check_vector,
    frame_body,
    join_terms,
    next_seq,
    same_dp,
    same_terms,
)

Code = grpc.StatusCode
INVALID = Code.INVALID_ARGUMENT
T, B, D = 3, 4, 4  # episode length, environments per batch, comm_dim
MAX_D = 8  # the largest comm_dim the simulator takes
SPEC = EnvSpec("toy", (AgentType("speaker", 1, obs_dim=3, n_actions=2),
                       AgentType("listener", 2, obs_dim=5, n_actions=4)), episode_length=T)
AGENTS = SPEC.agent_ids
SPEAKER, LISTENER, OTHER = AGENTS  # types 0, 1, 1
RUN = "run-1"
VECTOR_DP = pb.DpParams(clip_norm=1.0, noise_multiplier=0.5)
FEEDBACK_DP = pb.DpParams(clip_norm=2.0, noise_multiplier=0.25)  # unlike VECTOR_DP: no mixups
ALL_ROUTES = torch.ones(2, 2, dtype=torch.bool)
TERMS = Terms(ALL_ROUTES, D, None, VECTOR_DP, FEEDBACK_DP)


def refused(code: Code, fragment: str, call: Callable[..., object], *args: object,
            **kwargs: object) -> str:
    """Assert that ``call(*args, **kwargs)`` raises a ProtocolError with ``code`` whose message
    holds ``fragment``; returns the message."""
    with pytest.raises(ProtocolError) as e:
        call(*args, **kwargs)
    assert (e.value.code, fragment in e.value.message) == (code, True), e.value.message
    assert str(e.value) == e.value.message
    return e.value.message


def replace(msg: Message, **fields: object) -> Message:
    """Overwrite fields of ``msg``: messages are copied in, lists replace repeated fields."""
    for name, value in fields.items():
        if isinstance(value, Message):
            getattr(msg, name).CopyFrom(value)
        elif isinstance(value, list):
            del getattr(msg, name)[:]
            getattr(msg, name).extend(value)
        else:
            setattr(msg, name, value)
    return msg


def header(**changes: object) -> pb.Header:
    """The listener's header at round 2, step 1, with ``changes``."""
    return replace(pb.Header(run_id=RUN, round=2, step=1, sender=LISTENER, seq=5), **changes)


# -- headers -----------------------------------------------------------------------------------
def test_a_valid_header_passes_and_round_and_step_are_checked_only_where_given() -> None:
    check_header(header(), LISTENER, RUN, 2, 1)
    check_header(header(round=9, step=9), LISTENER, RUN)  # a join names no step


HEADERS = {
    "another agent": ({"sender": SPEAKER}, Code.PERMISSION_DENIED,
                      f"{LISTENER} cannot speak as '{SPEAKER}'"),
    "the simulator": ({"sender": "sim"}, Code.PERMISSION_DENIED, "cannot speak as 'sim'"),
    "no sender": ({"sender": ""}, Code.PERMISSION_DENIED, "cannot speak as ''"),
    "wrong run": ({"run_id": "run-0"}, Code.FAILED_PRECONDITION,
                  f"run 'run-0' is not this simulator's run '{RUN}'"),
    "no run": ({"run_id": ""}, Code.FAILED_PRECONDITION, "run '' is not"),
    "earlier round": ({"round": 1}, INVALID, "message for round 1 during round 2"),
    "later round": ({"round": 3}, INVALID, "message for round 3 during round 2"),
    "earlier step": ({"step": 0}, INVALID, "message for step 0 during step 1"),
    "later step": ({"step": 2}, INVALID, "message for step 2 during step 1"),
}


@pytest.mark.parametrize(("changes", "code", "fragment"), HEADERS.values(), ids=HEADERS)
def test_a_header_from_another_sender_run_round_or_step_is_refused(
        changes: dict, code: Code, fragment: str) -> None:
    refused(code, fragment, check_header, header(**changes), LISTENER, RUN, 2, 1)


def test_the_sender_is_checked_before_the_run_and_the_run_before_the_round() -> None:
    """Who speaks matters most: a forged sender is PERMISSION_DENIED whatever else is wrong."""
    refused(Code.PERMISSION_DENIED, "cannot speak as",
            check_header, header(sender=SPEAKER, run_id="x", round=0), LISTENER, RUN, 2, 1)
    refused(Code.FAILED_PRECONDITION, "run 'x'",
            check_header, header(run_id="x", round=0, step=0), LISTENER, RUN, 2, 1)


def test_sequence_numbers_must_follow_the_last_one() -> None:
    assert next_seq(header(seq=6), 5) == 6
    refused(INVALID, "sequence number 5 is replayed: expected 6", next_seq, header(seq=5), 5)
    refused(INVALID, "sequence number 1 is replayed: expected 6", next_seq, header(seq=1), 5)
    refused(INVALID, "sequence number 0 is replayed", next_seq, header(seq=0), 5)
    refused(INVALID, "sequence number 7 is out of order: expected 6", next_seq, header(seq=7), 5)
    refused(INVALID, f"sequence number {2**64 - 1} is out of order",
            next_seq, header(seq=2**64 - 1), 5)


@pytest.mark.parametrize("seq", [0, 2, 2**64 - 1])
def test_a_join_carries_sequence_number_one(seq: int) -> None:
    check_join_seq(header(seq=1))
    refused(INVALID, f"a join carries sequence number 1, got {seq}", check_join_seq,
            header(seq=seq))


# -- DP parameters -----------------------------------------------------------------------------
@pytest.mark.parametrize(("clip", "noise"), [(1.0, 0.0), (1e-9, 0.5), (1e9, 1e9)])
def test_dp_parameters_of_a_gaussian_mechanism_pass(clip: float, noise: float) -> None:
    check_dp(pb.DpParams(clip_norm=clip, noise_multiplier=noise), "vector_dp")


BAD_DP = {
    "zero clip": (0.0, 0.5, "got 0.0, 0.5"),
    "negative clip": (-1.0, 0.5, "got -1.0, 0.5"),
    "NaN clip": (math.nan, 0.5, "got nan, 0.5"),
    "inf clip": (math.inf, 0.5, "got inf, 0.5"),
    "-inf clip": (-math.inf, 0.5, "got -inf, 0.5"),
    "negative noise": (1.0, -0.1, "got 1.0, -0.1"),
    "NaN noise": (1.0, math.nan, "got 1.0, nan"),
    "inf noise": (1.0, math.inf, "got 1.0, inf"),
    "unset": (0.0, 0.0, "got 0.0, 0.0"),
}


@pytest.mark.parametrize(("clip", "noise", "fragment"), BAD_DP.values(), ids=BAD_DP)
def test_dp_parameters_no_gaussian_mechanism_has_are_refused(clip: float, noise: float,
                                                             fragment: str) -> None:
    message = refused(INVALID, fragment, check_dp,
                      pb.DpParams(clip_norm=clip, noise_multiplier=noise), "feedback_dp")
    assert message.startswith("feedback_dp: clip norm must be positive and noise multiplier "
                              "non-negative")


def test_dp_parameters_must_be_those_the_round_agreed_on() -> None:
    same_dp(pb.DpParams(clip_norm=1.0, noise_multiplier=0.5), VECTOR_DP, "the vector")
    refused(INVALID, "the vector declares clip 4, noise multiplier 0.5; the round agreed on "
                     "1, 0.5", same_dp, pb.DpParams(clip_norm=4.0, noise_multiplier=0.5),
            VECTOR_DP, "the vector")
    refused(INVALID, "the feedback declares clip 2, noise multiplier 0.3; the round agreed on "
                     "2, 0.25", same_dp, pb.DpParams(clip_norm=2.0, noise_multiplier=0.3),
            FEEDBACK_DP, "the feedback")
    refused(INVALID, "declares clip nan", same_dp,
            pb.DpParams(clip_norm=math.nan, noise_multiplier=0.5), VECTOR_DP, "the vector")


# -- joins -------------------------------------------------------------------------------------
def join(agent: str = LISTENER, **fields: object) -> pb.JoinRequest:
    """A valid join for ``agent``, with ``fields`` replaced."""
    kind = SPEC.types[SPEC.type_of_agent[AGENTS.index(agent)]]
    request = pb.JoinRequest(
        header=pb.Header(run_id=RUN, round=0, sender=agent, seq=1), agent_type=kind.name,
        obs_dim=kind.obs_dim, n_actions=kind.n_actions, comm_dim=D, vector_dp=VECTOR_DP,
        feedback_dp=FEEDBACK_DP, routes=encode(ALL_ROUTES))
    return replace(request, **fields)


def test_a_valid_join_declares_the_round_terms() -> None:
    routes = torch.tensor([[False, True], [True, False]])
    terms = join_terms(join(SPEAKER, routes=encode(routes), comm_dim=7), SPEC, 0, MAX_D)
    assert torch.equal(terms.routes, routes) and terms.routes.dtype == torch.bool
    assert (terms.comm_dim, terms.seed) == (7, None)
    assert (terms.vector_dp, terms.feedback_dp) == (VECTOR_DP, FEEDBACK_DP)
    assert join_terms(join(OTHER, seed=0), SPEC, 2, MAX_D).seed == 0  # declared, though zero
    assert join_terms(join(seed=2**64 - 1), SPEC, 1, MAX_D).seed == 2**64 - 1


JOIN_DECLARATIONS = {
    "another type": ({"agent_type": "speaker"},
                     "listener_0 is a listener with observations of 5 and 4 actions; the join "
                     "declares ('speaker', 5, 4)"),
    "no type": ({"agent_type": ""}, "the join declares ('', 5, 4)"),
    "obs_dim": ({"obs_dim": 3}, "the join declares ('listener', 3, 4)"),
    "n_actions": ({"n_actions": 2}, "the join declares ('listener', 5, 2)"),
    "zero comm_dim": ({"comm_dim": 0}, "comm_dim must be positive"),
    "comm_dim too large": ({"comm_dim": MAX_D + 1},
                           f"comm_dim {MAX_D + 1} exceeds the simulator's largest, {MAX_D}"),
    "zero vector clip": ({"vector_dp": pb.DpParams(clip_norm=0.0)},
                         "vector_dp: clip norm must be positive"),
    "NaN vector noise": ({"vector_dp": pb.DpParams(clip_norm=1.0, noise_multiplier=math.nan)},
                         "vector_dp: clip norm must be positive and noise multiplier "
                         "non-negative, got 1.0, nan"),
    "negative feedback noise": ({"feedback_dp": pb.DpParams(clip_norm=1.0,
                                                            noise_multiplier=-1.0)},
                                "feedback_dp: clip norm must be positive"),
    "inf feedback clip": ({"feedback_dp": pb.DpParams(clip_norm=math.inf)},
                          "feedback_dp: clip norm must be positive"),
    "routes shape": ({"routes": encode(torch.ones(3, 3, dtype=torch.bool))},
                     "routes: shape [3, 3], expected [2, 2]"),
    "routes dtype": ({"routes": encode(torch.ones(2, 2))},
                     "routes: dtype FLOAT32, expected BOOL"),
    "routes bytes": ({"routes": pb.Tensor(dtype=pb.BOOL, shape=[2, 2], data=b"\1" * 3)},
                     "routes: 3 bytes do not hold a bool tensor of shape [2, 2]"),
    "no routes": ({"routes": pb.Tensor()}, "routes: dtype DTYPE_UNSPECIFIED, expected BOOL"),
}


@pytest.mark.parametrize(("fields", "fragment"), JOIN_DECLARATIONS.values(),
                         ids=JOIN_DECLARATIONS)
def test_a_join_declaring_what_the_agent_is_not_is_refused(fields: dict, fragment: str) -> None:
    refused(INVALID, fragment, join_terms, join(**fields), SPEC, 1, MAX_D)


def test_a_join_is_checked_against_the_agent_it_comes_from() -> None:
    """A listener's join is valid for a listener's index only."""
    join_terms(join(LISTENER), SPEC, 2, MAX_D)
    refused(INVALID, "speaker_0 is a speaker with observations of 3 and 2 actions",
            join_terms, join(LISTENER), SPEC, 0, MAX_D)


ROUND_TERMS = {
    "routes": ({"routes": torch.eye(2, dtype=torch.bool)},
               "routes differ from those the round's first agent declared"),
    "a seed": ({"seed": 7}, "seed 7 declared; the round's first agent declared no seed"),
    "comm_dim": ({"comm_dim": D + 1}, f"comm_dim {D + 1}, the round uses {D}"),
    "vector_dp": ({"vector_dp": pb.DpParams(clip_norm=1.0, noise_multiplier=0.3)},
                  "vector_dp declares clip 1, noise multiplier 0.3; the round agreed on 1, 0.5"),
    "feedback_dp": ({"feedback_dp": VECTOR_DP},
                    "feedback_dp declares clip 1, noise multiplier 0.5; the round agreed on "
                    "2, 0.25"),
}


def terms(**changes: object) -> Terms:
    fields = {"routes": ALL_ROUTES, "comm_dim": D, "seed": None, "vector_dp": VECTOR_DP,
              "feedback_dp": FEEDBACK_DP}
    return Terms(**(fields | changes))


@pytest.mark.parametrize(("changes", "fragment"), ROUND_TERMS.values(), ids=ROUND_TERMS)
def test_a_join_disagreeing_with_the_first_joiners_terms_is_refused(changes: dict,
                                                                    fragment: str) -> None:
    same_terms(terms(), TERMS)
    refused(INVALID, fragment, same_terms, terms(**changes), TERMS)


def test_joiners_must_declare_the_same_seed_or_none() -> None:
    same_terms(terms(seed=7), terms(seed=7))
    refused(INVALID, "seed 8 declared; the round's first agent declared seed 7",
            same_terms, terms(seed=8), terms(seed=7))
    refused(INVALID, "no seed declared; the round's first agent declared seed 0",
            same_terms, terms(), terms(seed=0))


def test_the_last_round_number_leaves_none_for_the_next() -> None:
    check_round_number(2**32 - 2)
    refused(INVALID, f"round {2**32 - 1} leaves no number for the round after it",
            check_round_number, 2**32 - 1)


# -- the step loop -----------------------------------------------------------------------------
def vector_frame(values: torch.Tensor | None = None, dp: pb.DpParams = VECTOR_DP
                 ) -> pb.AgentFrame:
    """A knowledge vector (zeros unless ``values``; none at all if ``values`` is False)."""
    msg = pb.KnowledgeVector(header=header(), dp=dp)
    if values is not False:
        msg.vector.CopyFrom(encode(torch.zeros(B, D) if values is None else values))
    return pb.AgentFrame(vector=msg)


def action_frame(values: torch.Tensor) -> pb.AgentFrame:
    return pb.AgentFrame(action=pb.Action(header=header(), action=encode(values)))


def test_the_frame_holds_the_message_the_step_loop_waits_for() -> None:
    frame = vector_frame()
    assert frame_body(frame, "vector", 1) is frame.vector
    refused(INVALID, "action at step 1, got vector", frame_body, frame, "action", 1)
    refused(INVALID, "expected a vector at step 0, got action",
            frame_body, action_frame(torch.zeros(B, dtype=torch.long)), "vector", 0)
    refused(INVALID, "expected a vector at step 2, got an empty frame",
            frame_body, pb.AgentFrame(), "vector", 2)


def test_a_valid_vector_comes_back_decoded() -> None:
    values = torch.nn.functional.normalize(torch.randn(B, D), dim=1)
    vector = check_vector(vector_frame(values).vector, TERMS, B, 1, silent=False)
    assert torch.equal(vector, values) and vector.dtype == torch.float32


def test_an_agent_that_releases_nothing_sends_no_vector_and_routes_zeros() -> None:
    pruned = terms(routes=torch.tensor([[True, True], [False, False]]))  # listeners are mute
    for rules, silent in ((TERMS, True), (pruned, False)):
        vector = check_vector(vector_frame(False).vector, rules, B, 1, silent)
        assert torch.equal(vector, torch.zeros(B, D))
    assert check_vector(vector_frame().vector, pruned, B, 0, silent=False).shape == (B, D)


VECTORS = {
    "shape": (vector_frame(torch.zeros(B, D + 1)), "vector: shape [4, 5], expected [4, 4]"),
    "batch": (vector_frame(torch.zeros(B + 1, D)), "vector: shape [5, 4], expected [4, 4]"),
    "rank": (vector_frame(torch.zeros(B * D)), "vector: shape [16], expected [4, 4]"),
    "dtype": (vector_frame(torch.zeros(B, D).long()), "vector: dtype INT64, expected FLOAT32"),
    "bool": (vector_frame(torch.zeros(B, D, dtype=torch.bool)), "vector: dtype BOOL"),
    "NaN": (vector_frame(torch.full((B, D), math.nan)), "vector: contains NaN or Inf"),
    "Inf": (vector_frame(torch.full((B, D), math.inf)), "vector: contains NaN or Inf"),
    "-Inf": (vector_frame(torch.full((B, D), -math.inf)), "vector: contains NaN or Inf"),
    "bytes": (replace(vector_frame(), vector=pb.KnowledgeVector(
        header=header(), dp=VECTOR_DP, vector=pb.Tensor(dtype=pb.FLOAT32, shape=[B, D],
                                                        data=b"\0" * 63))),
        "vector: 63 bytes do not hold a float32 tensor of shape [4, 4]"),
    "norm above clip": (vector_frame(torch.full((B, D), 100.0)),
                        "vector: norm 200 exceeds what clip 1 with noise multiplier 0.5 can "
                        "produce (7"),
    "dp": (vector_frame(dp=pb.DpParams(clip_norm=4.0, noise_multiplier=0.5)),
           "the vector declares clip 4, noise multiplier 0.5; the round agreed on 1, 0.5"),
    "no dp": (vector_frame(dp=pb.DpParams()), "the vector declares clip 0, noise multiplier 0"),
    "missing": (vector_frame(False), "the knowledge vector is missing"),
}


@pytest.mark.parametrize(("frame", "fragment"), VECTORS.values(), ids=VECTORS)
def test_a_vector_that_is_not_a_release_as_declared_is_refused(frame: pb.AgentFrame,
                                                               fragment: str) -> None:
    refused(INVALID, fragment, check_vector, frame.vector, TERMS, B, 1, False)


def test_a_norm_is_checked_per_environment() -> None:
    """One environment's unclipped vector is enough, however small the others are."""
    values = torch.zeros(B, D)
    values[2] = 10.0  # norm 20
    refused(INVALID, "vector: norm 20 exceeds", check_vector, vector_frame(values).vector,
            TERMS, B, 1, False)


def test_a_vector_from_an_agent_that_releases_nothing_is_refused() -> None:
    refused(INVALID, "the agent joined silent: send no vector",
            check_vector, vector_frame().vector, TERMS, B, 1, True)
    refused(INVALID, "the agent joined silent: send no vector",  # even with routes pruned
            check_vector, vector_frame().vector, terms(routes=torch.zeros(2, 2, dtype=bool)),
            B, 1, True)
    pruned = terms(routes=torch.tensor([[True, True], [False, False]]))
    refused(INVALID, "every route from this agent's type is pruned: send no vector",
            check_vector, vector_frame().vector, pruned, B, 1, False)


def test_the_vector_dp_is_checked_even_where_nothing_is_released() -> None:
    refused(INVALID, "the vector declares clip 4",
            check_vector, vector_frame(False, pb.DpParams(clip_norm=4.0)).vector, TERMS, B,
            1, True)


def test_valid_actions_come_back_decoded() -> None:
    values = torch.tensor([0, 3, 1, 2])
    assert torch.equal(check_action(action_frame(values).action, B, 4), values)
    assert check_action(action_frame(torch.zeros(0, dtype=torch.long)).action, 0, 4).shape == (0,)


ACTIONS = {
    "one too large": (torch.tensor([0, 1, 4, 0]), "actions must lie in [0, 4)"),
    "huge": (torch.tensor([0, 2**62, 0, 0]), "actions must lie in [0, 4)"),
    "negative": (torch.tensor([0, -1, 0, 0]), "actions must lie in [0, 4)"),
    "most negative": (torch.tensor([-(2**63), 0, 0, 0]), "actions must lie in [0, 4)"),
    "dtype": (torch.zeros(B), "action: dtype FLOAT32, expected INT64"),
    "bool": (torch.zeros(B, dtype=torch.bool), "action: dtype BOOL, expected INT64"),
    "shape": (torch.zeros(B + 1, dtype=torch.long), "action: shape [5], expected [4]"),
    "rank": (torch.zeros(B, 1, dtype=torch.long), "action: shape [4, 1], expected [4]"),
}


@pytest.mark.parametrize(("values", "fragment"), ACTIONS.values(), ids=ACTIONS)
def test_actions_out_of_range_or_malformed_are_refused(values: torch.Tensor,
                                                       fragment: str) -> None:
    refused(INVALID, fragment, check_action, action_frame(values).action, B, 4)


def test_the_action_range_is_the_agents_own() -> None:
    action = action_frame(torch.full((B,), 3)).action
    check_action(action, B, 4)
    refused(INVALID, "actions must lie in [0, 2)", check_action, action, B, 2)
    refused(INVALID, "action: 31 bytes do not hold a int64 tensor", check_action,
            pb.Action(action=pb.Tensor(dtype=pb.INT64, shape=[B], data=b"\0" * 31)), B, 4)


# -- feedback ----------------------------------------------------------------------------------
# The speaker reached both listeners and listener_1 reached listener_0; nothing else was heard.
DELIVERED = torch.tensor([[False, False, False],
                          [True, False, True],
                          [True, False, False]])  # [receiver, sender]
FEEDBACK_VALUE = 0.1


def feedback(senders: list[int] = [0, 2], values: torch.Tensor | None = None,  # noqa: B006
             dp: pb.DpParams = FEEDBACK_DP) -> pb.FeedbackRequest:
    """Listener_0's feedback for ``senders`` (by default every agent that reached it)."""
    if values is None:
        values = torch.full((len(senders), T, B, D), FEEDBACK_VALUE)
    return pb.FeedbackRequest(header=header(step=T), senders=senders, grads=encode(values),
                              dp=dp)


def checked(request: pb.FeedbackRequest, receiver: int = 1, silent: bool = False
            ) -> tuple[list[int], torch.Tensor]:
    return check_feedback(request, receiver, AGENTS, TERMS, DELIVERED, silent, T, B)


def test_valid_feedback_comes_back_decoded() -> None:
    senders, grads = checked(feedback())
    assert senders == [0, 2] and torch.equal(grads, torch.full((2, T, B, D), FEEDBACK_VALUE))
    assert checked(feedback([2, 0]))[0] == [2, 0]  # in the order sent
    assert checked(feedback([2]))[0] == [2]  # a receiver may leave a sender out
    senders, grads = checked(feedback([]), receiver=0)  # the speaker heard no one
    assert (senders, grads.shape) == ([], (0, T, B, D))
    assert checked(feedback([]), silent=True)[0] == []  # a silent agent still reports, empty


FEEDBACK = {
    "undelivered sender": (feedback([0, 1]), f"feedback for {LISTENER}, whose vectors never "
                                             f"reached {LISTENER}"),
    "sender to the speaker": (feedback([1]), f"feedback for {LISTENER}, whose vectors"),
    "unknown sender": (feedback([7]), f"feedback for #7, whose vectors never reached {LISTENER}"),
    "largest sender": (feedback([2**32 - 1]), f"feedback for #{2**32 - 1}"),
    "sender twice": (feedback([2, 2]), "a sender appears twice in the feedback"),
    "shape": (feedback([0], torch.zeros(1, T, B, D + 1)),
              "feedback: shape [1, 3, 4, 5], expected [1, 3, 4, 4]"),
    "one sender short": (feedback([0, 2], torch.zeros(1, T, B, D)),
                         "feedback: shape [1, 3, 4, 4], expected [2, 3, 4, 4]"),
    "episode length": (feedback([0], torch.zeros(1, T + 1, B, D)),
                       "feedback: shape [1, 4, 4, 4], expected [1, 3, 4, 4]"),
    "dtype": (feedback([0], torch.zeros(1, T, B, D).long()),
              "feedback: dtype INT64, expected FLOAT32"),
    "NaN": (feedback([0], torch.full((1, T, B, D), math.nan)), "feedback: contains NaN or Inf"),
    "Inf": (feedback([0], torch.full((1, T, B, D), math.inf)), "feedback: contains NaN or Inf"),
    "bytes": (replace(feedback([0]), grads=pb.Tensor(dtype=pb.FLOAT32, shape=[1, T, B, D],
                                                     data=b"\0" * 193)),
              "feedback: 193 bytes do not hold a float32 tensor of shape [1, 3, 4, 4]"),
    "norm above clip": (feedback([0], torch.full((1, T, B, D), 10.0)),
                        "feedback: norm 34.64 exceeds what clip 2 with noise multiplier 0.25"),
    "dp": (feedback(dp=VECTOR_DP), "the feedback declares clip 1, noise multiplier 0.5; the "
                                   "round agreed on 2, 0.25"),
}


@pytest.mark.parametrize(("request_", "fragment"), FEEDBACK.values(), ids=FEEDBACK)
def test_feedback_for_senders_never_heard_or_not_released_as_declared_is_refused(
        request_: pb.FeedbackRequest, fragment: str) -> None:
    refused(INVALID, fragment, checked, request_)


def test_feedback_norms_are_per_episode_over_all_steps() -> None:
    """Each (sender, environment) is one release of ``T * D`` coordinates, clipped to 2: its
    bound is 8.73. Norm 6 at every step is within one step's bound (8) and not within the
    episode's; norm 8 in every environment at one step is within it, however many there are."""
    refused(INVALID, "feedback: norm 10.39 exceeds", checked,
            feedback([0], torch.full((1, T, B, D), 3.0)))
    values = torch.zeros(1, T, B, D)
    values[0, 0] = 4.0
    checked(feedback([0], values))


def test_a_silent_agent_sends_feedback_for_no_sender() -> None:
    refused(INVALID, "the agent joined silent: send feedback for no sender",
            checked, feedback([0]), silent=True)


# -- the round's refusals ----------------------------------------------------------------------
def test_an_agent_joins_a_round_once_and_the_round_starts_when_all_have() -> None:
    rnd = Round(0, AGENTS)
    assert not rnd.admit(1, TERMS, silent=False)
    refused(Code.ALREADY_EXISTS, f"{LISTENER} already joined round 0", rnd.admit, 1, TERMS,
            False)
    refused(INVALID, "comm_dim 5, the round uses 4", rnd.admit, 0, terms(comm_dim=5), False)
    assert rnd.missing() == [SPEAKER, OTHER]
    assert not rnd.admit(0, TERMS, silent=True) and rnd.admit(2, TERMS, silent=False)
    assert (rnd.phase, rnd.silent) == (Phase.JOINING, {0})


def test_the_terms_leave_with_the_last_joiner() -> None:
    rnd = Round(0, AGENTS)
    rnd.admit(1, terms(comm_dim=9), silent=True)
    rnd.leave(1)
    assert (rnd.slots, rnd.silent, rnd.terms) == ({}, set(), None)
    assert not rnd.admit(1, TERMS, silent=False)  # the round takes new terms


def test_only_the_next_round_can_be_joined() -> None:
    """A join for a later round would open a round that blocks every honest join."""
    gathering = Round(3, AGENTS)
    assert round_to_join(gathering, 2, 3, AGENTS) is gathering
    refused(Code.FAILED_PRECONDITION, "round 3 is gathering agents; cannot join round 4",
            round_to_join, gathering, 2, 4, AGENTS)
    running = Round(3, AGENTS, phase=Phase.RUNNING)
    refused(Code.FAILED_PRECONDITION, "round 3 is running; join after it ends",
            round_to_join, running, 3, 4, AGENTS)
    refused(Code.FAILED_PRECONDITION, "round 3 already ran; the next round is 4",
            round_to_join, None, 3, 3, AGENTS)
    for far in (5, 2**32 - 1):
        refused(Code.FAILED_PRECONDITION, f"round {far} is not open; the next round is 4",
                round_to_join, None, 3, far, AGENTS)
    refused(INVALID, "leaves no number for the round after it",
            round_to_join, None, 2**32 - 2, 2**32 - 1, AGENTS)
    assert round_to_join(None, -1, 0, AGENTS).number == 0


def test_a_round_begun_during_feedback_fails_the_one_before() -> None:
    waiting = Round(3, AGENTS, phase=Phase.FEEDBACK)
    assert round_to_join(waiting, 3, 4, AGENTS).number == 4
    assert waiting.phase is Phase.CLOSED and waiting.feedback_done.is_set()
    assert waiting.failure == "round 4 began before round 3's feedback completed"


def test_each_receiver_sends_feedback_once_and_the_sums_go_to_the_senders() -> None:
    rnd = Round(0, AGENTS, phase=Phase.FEEDBACK)
    ones = torch.ones(1, T, B, D)
    assert not rnd.record_feedback(1, [0], ones)
    refused(Code.ALREADY_EXISTS, f"{LISTENER} already sent its feedback",
            rnd.check_feedback_pending, 1)
    refused(Code.ALREADY_EXISTS, f"{LISTENER} already sent its feedback",
            rnd.record_feedback, 1, [0], ones)
    assert not rnd.record_feedback(0, [], torch.zeros(0, T, B, D))
    assert rnd.record_feedback(2, [0, 1], torch.cat([ones, 2 * ones]))
    assert rnd.phase is Phase.CLOSED and rnd.failure is None
    assert torch.equal(rnd.feedback_sums, torch.stack([2 * ones[0], 2 * ones[0], 0 * ones[0]]))


# -- a discrete channel and a release schedule -------------------------------------------------
RR_DP = pb.DpParams(clip_norm=1.0, rr_epsilon=2.0, symbols=D)


def test_a_discrete_channel_declares_randomized_response_over_comm_dim_codewords() -> None:
    assert join_terms(join(vector_dp=RR_DP), SPEC, 1, MAX_D).vector_dp == RR_DP
    refused(INVALID, "randomized response needs at least 2 symbols, clip norm 1 and no "
                     "Gaussian noise", join_terms,
            join(vector_dp=pb.DpParams(clip_norm=1.0, noise_multiplier=0.5, rr_epsilon=2.0,
                                       symbols=D)), SPEC, 1, MAX_D)
    refused(INVALID, "one-hot rows of its 3 symbols, not of comm_dim 4", join_terms,
            join(vector_dp=pb.DpParams(clip_norm=1.0, rr_epsilon=2.0, symbols=3)), SPEC, 1, MAX_D)
    refused(INVALID, "feedback_dp: feedback is a Gaussian release", join_terms,
            join(vector_dp=RR_DP, feedback_dp=RR_DP), SPEC, 1, MAX_D)
    refused(INVALID, "rr_epsilon must be finite", check_dp,
            pb.DpParams(clip_norm=1.0, rr_epsilon=math.inf, symbols=D), "vector_dp")
    refused(INVALID, "declares randomized response over 4 symbols at epsilon 3; the round "
                     "agreed on randomized response over 4 symbols at epsilon 2", same_dp,
            pb.DpParams(clip_norm=1.0, rr_epsilon=3.0, symbols=D), RR_DP, "vector_dp")


def test_a_discrete_vector_is_a_one_hot_row_per_environment() -> None:
    discrete = terms(vector_dp=RR_DP)
    codewords = torch.eye(D)[torch.tensor([0, 3, 1, 1])]
    torch.testing.assert_close(
        check_vector(vector_frame(codewords, RR_DP).vector, discrete, B, 1, False), codewords)
    for bad in (codewords * 0.5, torch.zeros(B, D)):
        refused(INVALID, "a discrete channel's vector is a one-hot row per environment",
                check_vector, vector_frame(bad, RR_DP).vector, discrete, B, 1, False)
    two_hot = codewords + torch.eye(D)[[1, 0, 0, 0]]  # caught by its norm already
    refused(INVALID, "vector: norm 1.414 exceeds", check_vector,
            vector_frame(two_hot, RR_DP).vector, discrete, B, 1, False)


def test_a_sender_releases_only_on_its_schedule_and_every_joiner_declares_it() -> None:
    every_5 = terms(release_every=5)
    assert check_vector(vector_frame().vector, every_5, B, 1, False, 10).shape == (B, D)
    refused(INVALID, "the schedule releases every 5 steps: send no vector at step 3",
            check_vector, vector_frame().vector, every_5, B, 1, False, 3)
    assert not check_vector(vector_frame(False).vector, every_5, B, 1, False, 3).any()
    refused(INVALID, "the knowledge vector is missing", check_vector,
            vector_frame(False).vector, every_5, B, 1, False, 5)
    assert join_terms(join(release_every=5), SPEC, 1, MAX_D).release_every == 5
    assert join_terms(join(), SPEC, 1, MAX_D).release_every == 1  # 0 on the wire: every step
    refused(INVALID, "a release every 1 steps declared; the round releases every 5",
            same_terms, terms(), every_5)
