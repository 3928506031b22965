"""The wire protocol: committed stubs match the .proto; tensors round-trip and are checked."""

import math
import re

import grpc
import pytest
import torch

from fedcomm.protocol import codegen
from fedcomm.protocol.auth import (
    call_metadata,
    claimed_identity,
    generate_tokens,
    read_tokens,
    write_tokens,
)
from fedcomm.protocol.codec import ProtocolError, check_norms, decode, encode, norm_bound
from fedcomm.protocol.v1 import joint_env_pb2 as pb


def test_committed_stubs_are_what_the_proto_generates(tmp_path):
    for path in codegen.generate(tmp_path):
        committed = codegen.HERE / "v1" / path.name
        assert committed.read_bytes() == path.read_bytes(), (
            f"{committed.name} is stale: run python -m fedcomm.protocol.codegen")


@pytest.mark.parametrize("tensor", [
    torch.randn(7, 16), torch.randint(-5, 5, (3, 4, 2)), torch.rand(5, 3) > 0.5,
    torch.zeros(0, 16)])
def test_tensors_round_trip_as_little_endian_bytes(tensor):
    msg = pb.Tensor.FromString(encode(tensor).SerializeToString())
    assert len(msg.data) == tensor.numel() * tensor.element_size()
    wire = {torch.float32: pb.FLOAT32, torch.int64: pb.INT64, torch.bool: pb.BOOL}[tensor.dtype]
    assert torch.equal(decode(msg, "x", wire, tuple(tensor.shape)), tensor)
    if tensor.dtype == torch.float32 and tensor.numel():
        assert msg.data[:4] == tensor[0, 0].numpy().astype("<f4").tobytes()


def bad(msg: pb.Tensor, dtype: int = pb.FLOAT32, shape=(2, 3)) -> str:
    with pytest.raises(ProtocolError) as e:
        decode(msg, "vector", dtype, shape)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    return e.value.message


def test_decode_refuses_what_does_not_match_its_declaration():
    good = encode(torch.ones(2, 3))
    assert "dtype FLOAT32, expected INT64" in bad(good, dtype=pb.INT64)
    assert "shape [2, 3], expected [2, 4]" in bad(good, shape=(2, 4))
    assert "expected [*, 3, 1]" in bad(good, shape=(None, 3, 1))
    assert "do not hold" in bad(pb.Tensor(dtype=pb.FLOAT32, shape=[2, 3], data=b"\0" * 23))
    assert "negative" in bad(pb.Tensor(dtype=pb.FLOAT32, shape=[-2, -3], data=b"\0" * 24),
                             shape=(None, None))
    for value in (math.nan, math.inf, -math.inf):
        x = torch.ones(2, 3)
        x[1, 2] = value
        assert "NaN or Inf" in bad(encode(x))
    assert decode(good, "vector", pb.FLOAT32, (None, 3)).shape == (2, 3)


def test_norm_check_allows_noised_releases_and_catches_unclipped_ones():
    dp = pb.DpParams(clip_norm=1.0, noise_multiplier=0.5)
    honest = torch.nn.functional.normalize(torch.randn(10_000, 16), dim=1) + 0.5 * torch.randn(
        10_000, 16)
    check_norms(honest, "vector", dp, row_dims=1)  # no false alarm over 10k releases
    with pytest.raises(ProtocolError, match="exceeds"):
        check_norms(honest * 4, "vector", dp, row_dims=1)
    exact = pb.DpParams(clip_norm=2.0, noise_multiplier=0.0)
    check_norms(torch.full((3, 4), 1.0), "vector", exact, row_dims=1)  # norm exactly 2
    with pytest.raises(ProtocolError):
        check_norms(torch.full((3, 4), 1.01), "vector", exact, row_dims=1)
    assert norm_bound(exact, 4) == pytest.approx(2.0, rel=1e-4)


def test_tokens_identify_agents(tmp_path):
    tokens = generate_tokens(["a", "b"])
    assert len(set(tokens.values())) == 2 and all(len(t) >= 32 for t in tokens.values())
    write_tokens(tmp_path / "t.json", tokens)
    assert (tmp_path / "t.json").stat().st_mode & 0o077 == 0  # owner only
    assert read_tokens(tmp_path / "t.json") == tokens
    assert claimed_identity(call_metadata("a", tokens["a"])) == ("a", tokens["a"])
    (tmp_path / "bad.json").write_text('{"a": 3}')
    with pytest.raises(ValueError, match="agent id -> non-empty token"):
        read_tokens(tmp_path / "bad.json")


@pytest.mark.parametrize(("metadata", "fragment"), [
    ((), "no x-fedcomm-agent metadata"),
    ((("x-fedcomm-agent", "a"),), "no authorization metadata"),
    ((("x-fedcomm-agent", "a"), ("authorization", "t")), "expected 'Bearer <token>'"),
    ((*call_metadata("a", "t"), ("x-fedcomm-agent", "b")), "2 x-fedcomm-agent metadata values"),
    ((("x-fedcomm-agent-bin", b"\xff"), ("authorization", "Bearer t")),
     "x-fedcomm-agent-bin metadata: the x-fedcomm-agent is text"),
    ((("x-fedcomm-agent", b"a"), ("authorization", "Bearer t")),
     "x-fedcomm-agent metadata: not text"),
])
def test_metadata_that_does_not_name_one_agent_and_its_token_is_refused(metadata, fragment):
    with pytest.raises(ValueError, match=re.escape(fragment)):
        claimed_identity(metadata)
    garbage = (("trace-bin", b"\xff\xfe"), ("user-agent", "x"))
    assert claimed_identity((*garbage, *call_metadata("a", "t"))) == ("a", "t")
