from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    FLOAT32: _ClassVar[DType]
    INT64: _ClassVar[DType]
    BOOL: _ClassVar[DType]
DTYPE_UNSPECIFIED: DType
FLOAT32: DType
INT64: DType
BOOL: DType

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class Header(_message.Message):
    __slots__ = ("run_id", "round", "step", "sender", "seq")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    SENDER_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    round: int
    step: int
    sender: str
    seq: int
    def __init__(self, run_id: _Optional[str] = ..., round: _Optional[int] = ..., step: _Optional[int] = ..., sender: _Optional[str] = ..., seq: _Optional[int] = ...) -> None: ...

class DpParams(_message.Message):
    __slots__ = ("clip_norm", "noise_multiplier", "rr_epsilon", "symbols")
    CLIP_NORM_FIELD_NUMBER: _ClassVar[int]
    NOISE_MULTIPLIER_FIELD_NUMBER: _ClassVar[int]
    RR_EPSILON_FIELD_NUMBER: _ClassVar[int]
    SYMBOLS_FIELD_NUMBER: _ClassVar[int]
    clip_norm: float
    noise_multiplier: float
    rr_epsilon: float
    symbols: int
    def __init__(self, clip_norm: _Optional[float] = ..., noise_multiplier: _Optional[float] = ..., rr_epsilon: _Optional[float] = ..., symbols: _Optional[int] = ...) -> None: ...

class AgentInfo(_message.Message):
    __slots__ = ("agent_id", "agent_type", "index")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    AGENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    agent_type: str
    index: int
    def __init__(self, agent_id: _Optional[str] = ..., agent_type: _Optional[str] = ..., index: _Optional[int] = ...) -> None: ...

class DescribeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SimInfo(_message.Message):
    __slots__ = ("run_id", "env", "num_envs", "episode_length", "bandwidth", "agents", "agent_types", "round", "max_message_bytes")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ENV_FIELD_NUMBER: _ClassVar[int]
    NUM_ENVS_FIELD_NUMBER: _ClassVar[int]
    EPISODE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    BANDWIDTH_FIELD_NUMBER: _ClassVar[int]
    AGENTS_FIELD_NUMBER: _ClassVar[int]
    AGENT_TYPES_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    env: str
    num_envs: int
    episode_length: int
    bandwidth: int
    agents: _containers.RepeatedCompositeFieldContainer[AgentInfo]
    agent_types: _containers.RepeatedScalarFieldContainer[str]
    round: int
    max_message_bytes: int
    def __init__(self, run_id: _Optional[str] = ..., env: _Optional[str] = ..., num_envs: _Optional[int] = ..., episode_length: _Optional[int] = ..., bandwidth: _Optional[int] = ..., agents: _Optional[_Iterable[_Union[AgentInfo, _Mapping]]] = ..., agent_types: _Optional[_Iterable[str]] = ..., round: _Optional[int] = ..., max_message_bytes: _Optional[int] = ...) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = ("header", "agent_type", "obs_dim", "n_actions", "comm_dim", "vector_dp", "feedback_dp", "routes", "seed", "silent", "release_every")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    AGENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    OBS_DIM_FIELD_NUMBER: _ClassVar[int]
    N_ACTIONS_FIELD_NUMBER: _ClassVar[int]
    COMM_DIM_FIELD_NUMBER: _ClassVar[int]
    VECTOR_DP_FIELD_NUMBER: _ClassVar[int]
    FEEDBACK_DP_FIELD_NUMBER: _ClassVar[int]
    ROUTES_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    SILENT_FIELD_NUMBER: _ClassVar[int]
    RELEASE_EVERY_FIELD_NUMBER: _ClassVar[int]
    header: Header
    agent_type: str
    obs_dim: int
    n_actions: int
    comm_dim: int
    vector_dp: DpParams
    feedback_dp: DpParams
    routes: Tensor
    seed: int
    silent: bool
    release_every: int
    def __init__(self, header: _Optional[_Union[Header, _Mapping]] = ..., agent_type: _Optional[str] = ..., obs_dim: _Optional[int] = ..., n_actions: _Optional[int] = ..., comm_dim: _Optional[int] = ..., vector_dp: _Optional[_Union[DpParams, _Mapping]] = ..., feedback_dp: _Optional[_Union[DpParams, _Mapping]] = ..., routes: _Optional[_Union[Tensor, _Mapping]] = ..., seed: _Optional[int] = ..., silent: _Optional[bool] = ..., release_every: _Optional[int] = ...) -> None: ...

class JoinReply(_message.Message):
    __slots__ = ("header", "agent_index", "agents", "num_envs", "episode_length", "bandwidth")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    AGENT_INDEX_FIELD_NUMBER: _ClassVar[int]
    AGENTS_FIELD_NUMBER: _ClassVar[int]
    NUM_ENVS_FIELD_NUMBER: _ClassVar[int]
    EPISODE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    BANDWIDTH_FIELD_NUMBER: _ClassVar[int]
    header: Header
    agent_index: int
    agents: _containers.RepeatedCompositeFieldContainer[AgentInfo]
    num_envs: int
    episode_length: int
    bandwidth: int
    def __init__(self, header: _Optional[_Union[Header, _Mapping]] = ..., agent_index: _Optional[int] = ..., agents: _Optional[_Iterable[_Union[AgentInfo, _Mapping]]] = ..., num_envs: _Optional[int] = ..., episode_length: _Optional[int] = ..., bandwidth: _Optional[int] = ...) -> None: ...

class Observation(_message.Message):
    __slots__ = ("header", "obs", "reward")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    OBS_FIELD_NUMBER: _ClassVar[int]
    REWARD_FIELD_NUMBER: _ClassVar[int]
    header: Header
    obs: Tensor
    reward: Tensor
    def __init__(self, header: _Optional[_Union[Header, _Mapping]] = ..., obs: _Optional[_Union[Tensor, _Mapping]] = ..., reward: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class KnowledgeVector(_message.Message):
    __slots__ = ("header", "vector", "dp")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    DP_FIELD_NUMBER: _ClassVar[int]
    header: Header
    vector: Tensor
    dp: DpParams
    def __init__(self, header: _Optional[_Union[Header, _Mapping]] = ..., vector: _Optional[_Union[Tensor, _Mapping]] = ..., dp: _Optional[_Union[DpParams, _Mapping]] = ...) -> None: ...

class RoutedVectors(_message.Message):
    __slots__ = ("header", "senders", "vectors", "delivered")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    SENDERS_FIELD_NUMBER: _ClassVar[int]
    VECTORS_FIELD_NUMBER: _ClassVar[int]
    DELIVERED_FIELD_NUMBER: _ClassVar[int]
    header: Header
    senders: _containers.RepeatedScalarFieldContainer[int]
    vectors: Tensor
    delivered: Tensor
    def __init__(self, header: _Optional[_Union[Header, _Mapping]] = ..., senders: _Optional[_Iterable[int]] = ..., vectors: _Optional[_Union[Tensor, _Mapping]] = ..., delivered: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class Action(_message.Message):
    __slots__ = ("header", "action")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    header: Header
    action: Tensor
    def __init__(self, header: _Optional[_Union[Header, _Mapping]] = ..., action: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class EpisodeEnd(_message.Message):
    __slots__ = ("header", "reward", "truncated", "reason")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    REWARD_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    header: Header
    reward: Tensor
    truncated: bool
    reason: str
    def __init__(self, header: _Optional[_Union[Header, _Mapping]] = ..., reward: _Optional[_Union[Tensor, _Mapping]] = ..., truncated: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...

class AgentFrame(_message.Message):
    __slots__ = ("vector", "action")
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    vector: KnowledgeVector
    action: Action
    def __init__(self, vector: _Optional[_Union[KnowledgeVector, _Mapping]] = ..., action: _Optional[_Union[Action, _Mapping]] = ...) -> None: ...

class SimFrame(_message.Message):
    __slots__ = ("observation", "routed", "end")
    OBSERVATION_FIELD_NUMBER: _ClassVar[int]
    ROUTED_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    observation: Observation
    routed: RoutedVectors
    end: EpisodeEnd
    def __init__(self, observation: _Optional[_Union[Observation, _Mapping]] = ..., routed: _Optional[_Union[RoutedVectors, _Mapping]] = ..., end: _Optional[_Union[EpisodeEnd, _Mapping]] = ...) -> None: ...

class FeedbackRequest(_message.Message):
    __slots__ = ("header", "senders", "grads", "dp")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    SENDERS_FIELD_NUMBER: _ClassVar[int]
    GRADS_FIELD_NUMBER: _ClassVar[int]
    DP_FIELD_NUMBER: _ClassVar[int]
    header: Header
    senders: _containers.RepeatedScalarFieldContainer[int]
    grads: Tensor
    dp: DpParams
    def __init__(self, header: _Optional[_Union[Header, _Mapping]] = ..., senders: _Optional[_Iterable[int]] = ..., grads: _Optional[_Union[Tensor, _Mapping]] = ..., dp: _Optional[_Union[DpParams, _Mapping]] = ...) -> None: ...

class FeedbackReply(_message.Message):
    __slots__ = ("header", "grad", "receivers")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    GRAD_FIELD_NUMBER: _ClassVar[int]
    RECEIVERS_FIELD_NUMBER: _ClassVar[int]
    header: Header
    grad: Tensor
    receivers: int
    def __init__(self, header: _Optional[_Union[Header, _Mapping]] = ..., grad: _Optional[_Union[Tensor, _Mapping]] = ..., receivers: _Optional[int] = ...) -> None: ...
