"""What a run is: its whole configuration, in one leaf that every party and mode shares.

A ``TrainConfig`` is the environment, the models (``TeamConfig``), PPO (``PPOConfig``), the
privacy settings and the budget in environment steps: the centralized trainer runs it as is.
A ``FederationConfig`` adds how rounds are federated, so a federated run and its centralized
reference differ only in what federation changes. The agents and the server both read it (the
ServerApp sends it with every round) and neither imports the other; this module imports only
the environments and the privacy settings.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from functools import lru_cache
from typing import Literal

from fedcomm.privacy.config import PrivacyConfig
from fedcomm.sim.base import EnvSpec


def env_spec(env: str, env_kwargs: dict | None = None) -> EnvSpec:
    """The spec of environment ``env`` with options ``env_kwargs``: its agents, their types,
    observation and action sizes, and the episode length."""
    return _spec(env, json.dumps(env_kwargs or {}, sort_keys=True))


@lru_cache(maxsize=32)
def _spec(env: str, env_kwargs: str) -> EnvSpec:
    from fedcomm.sim.registry import make_env  # the environments load on first use

    return make_env(env, 1, **json.loads(env_kwargs)).spec


@dataclass
class TeamConfig:
    """The agents' networks and their channel."""

    hidden: int = 64
    comm_dim: int = 16
    encoder: str = "mlp"  # or "superposition"
    n_superpositions: int = 8
    # The shared module takes each agent's type as an input (one-hot, ``models.comm``): one
    # module for every type, averaged across a heterogeneous team's agents (``share="all"``).
    typed_comm: bool = False
    recurrent: bool = False
    clip: float = 1.0  # C: every knowledge vector is clipped to this L2 norm
    noise_multiplier: float = 0.5  # sigma: channel noise std is sigma * C per coordinate
    # Feedback gradients a receiver releases in federated training: clipped per episode to this
    # norm, noised with this multiplier.
    feedback_clip: float = 1.0
    feedback_noise_multiplier: float = 0.5
    communicate: bool = True  # False delivers nothing: the no-communication ablation
    # Each receiver hears, from each sender, the running mean of that sender's vectors delivered
    # to it so far in the episode: evidence that repeats across steps accumulates, and the noise
    # of T releases averages out. Post-processing of what was released: no privacy cost.
    accumulate: bool = False
    prune_threshold: float = 0.3  # routes whose strength falls below this are not sent
    graph_init: float = 1.0  # initial route logit (strength sigmoid(1) = 0.73)
    # "gaussian": a vector clip(encode(f), C) + N(0, (sigma C)^2); "discrete": one of `symbols`
    # codewords, sampled from the encoder's softmax and privatised by K-ary randomized
    # response at `rr_epsilon` per release (the vector is its one-hot; comm_dim = symbols).
    channel: str = "gaussian"
    symbols: int = 4
    rr_epsilon: float = 8.0
    # A discrete code's logits are standardised over the codewords and scaled by this, so a
    # new code depends on what its sender sees (raw, it starts near uniform). A code that
    # carries nothing gives neither side a gradient: a receiver cannot use a codeword that
    # says nothing, a sender gains nothing from one its receivers ignore.
    code_scale: float = 3.0
    # A sender releases at steps 0, k, 2k, ... of an episode: a data-independent schedule.
    # Receivers keep what they heard (accumulate or a GRU), so k > 1 needs one of them.
    release_every: int = 1
    # The routes a sender may use at all, "sender>receiver" by type name, comma-separated;
    # empty: every route (the graph learns which to keep). A receiver that needs to say
    # nothing then releases nothing.
    routes: str = ""
    # Receivers send DIAL feedback to the senders they heard (a release: clipped and noised).
    # Off, receivers release nothing of this kind: a discrete channel's senders then learn
    # their code from the team reward (the codeword is part of the sender's action, PPO's
    # ratio covers its probability); a Gaussian channel's encoders learn nothing (an ablation).
    feedback: bool = True
    # Each sender of a discrete channel also holds a private decoder that recalls what it saw
    # from the distribution of the codeword it released, trained with the rest of its
    # networks (``PPOConfig.recall_coef``): its error bounds from below the information the
    # code carries about what the sender sees (Barber and Agakov 2003), episode by episode,
    # so it trains under DP-SGD with nothing about the batch released.
    recall: bool = False
    # Adam steps of the senders' recall error on public observations before training
    # (``models.warmup``): a code that tells apart what each sender sees, formed before any
    # episode and any privacy noise; 0: the code forms in training.
    code_warmup: int = 0

    @property
    def code_from_reward(self) -> bool:
        """Whether each released codeword is part of its sender's action: a discrete channel
        without feedback, where nothing but the reward can teach the senders their code."""
        return self.channel == "discrete" and not self.feedback

    def __post_init__(self) -> None:
        if not (0 < self.clip < math.inf and 0 < self.feedback_clip < math.inf):
            raise ValueError("clip norms must be positive and finite")
        if self.channel not in ("gaussian", "discrete"):
            raise ValueError(f"channel must be gaussian or discrete, got {self.channel!r}")
        if self.channel == "discrete":
            if self.symbols < 2 or not 0 < self.rr_epsilon < math.inf:
                raise ValueError("a discrete channel needs at least 2 symbols and a positive, "
                                 "finite rr_epsilon")
            if not 0 < self.code_scale < math.inf:
                raise ValueError("code_scale must be positive and finite")
            self.comm_dim = self.symbols
        elif self.recall:
            raise ValueError("recall (--recall) is for a discrete channel's senders "
                             "(--channel discrete)")
        if self.code_warmup < 0:
            raise ValueError(f"code_warmup must be non-negative, got {self.code_warmup}")
        if self.code_warmup and not self.recall:
            raise ValueError("a code warm-up (--code-warmup) trains the senders' recall "
                             "decoders: set recall (--recall)")
        if self.release_every < 1:
            raise ValueError("release_every must be at least 1")
        if self.release_every > 1 and not (self.accumulate or self.recurrent):
            raise ValueError(f"release_every {self.release_every}: a sender that releases "
                             "every k > 1 steps needs receivers that keep what they heard: "
                             "set accumulate (--accumulate) or recurrent (--recurrent)")
        if min(self.noise_multiplier, self.feedback_noise_multiplier) < 0:
            raise ValueError("noise multipliers must be non-negative")
        if self.hidden < 1 or self.comm_dim < 1:
            raise ValueError("hidden and comm_dim must be positive")

    def allowed_routes(self, spec: EnvSpec) -> list[list[bool]]:
        """``[K][K]`` the routes ``routes`` allows, sender type by receiver type."""
        k = len(spec.types)
        if not self.routes:
            return [[True] * k for _ in range(k)]
        names = [t.name for t in spec.types]
        allowed = [[False] * k for _ in range(k)]
        for route in self.routes.split(","):
            sender, sep, receiver = route.strip().partition(">")
            if not sep or sender not in names or receiver not in names:
                raise ValueError(f"route {route!r}: expected sender>receiver of the types "
                                 f"{', '.join(names)}")
            allowed[names.index(sender)][names.index(receiver)] = True
        return allowed

    def releases_per_episode(self, episode_length: int) -> int:
        """How many times a sender releases in one episode (its schedule)."""
        return -(-episode_length // self.release_every)


ADAM_BETAS = (0.9, 0.999)
"""Every agent's optimizer is Adam with these betas (``learning.ppo.make_optimizer``): with
them the server bounds how far an honest agent's update can move a parameter in a round."""


def adam_step_bound(betas: tuple[float, float] = ADAM_BETAS) -> float:
    """The most one Adam step moves a parameter, in units of the learning rate, whatever the
    gradients: ``(1 - b1) / sqrt(1 - b2) / sqrt(1 - b1**2 / b2)`` (Cauchy-Schwarz on the
    moment estimates; 7.27 for the default betas, never reached in practice)."""
    b1, b2 = betas
    return (1 - b1) / math.sqrt(1 - b2) / math.sqrt(1 - b1**2 / b2)


@dataclass
class PPOConfig:
    """PPO's settings for every agent."""

    lr: float = 1e-3
    epochs: int = 4
    minibatches: int = 4
    clip_coef: float = 0.2
    gamma: float = 0.99
    gae_lambda: float = 0.95
    ent_coef: float = 0.01
    vf_coef: float = 0.5
    max_grad_norm: float = 0.5
    graph_cost: float = 1e-3  # price per unit of route strength: unused routes get pruned
    # Whether the receivers' value loss is part of the DIAL feedback a federated party sends.
    # Off: feedback is computed once per batch and reused in every minibatch of every epoch, and
    # the critics' error it carries is stale after the first step (critics fit fast), so the
    # senders' encoders keep being pushed to fix errors that are already gone; on factory this
    # drowns the policy signal and communication is never learned.
    feedback_value: bool = False
    # Positive signalling (Eccles et al. 2019) for a discrete channel's senders: each one's
    # loss rewards the mutual information between what it sees and the codeword it releases,
    # estimated over the minibatch, H(mean of its release distributions) - mean H(each one).
    # A new code says nothing about the sender's observation, so receivers cannot learn to
    # read it and senders gain nothing from changing it; this bias gives the code content
    # before the reward can. The minibatch estimate links episodes: under DP-SGD it reads a
    # released marginal (``PrivacyConfig.update_statistics``).
    signal_coef: float = 0.0
    # The weight of each sender's recall error (``TeamConfig.recall``) in its loss.
    recall_coef: float = 1.0

    def __post_init__(self) -> None:
        if not 0 < self.lr < math.inf:
            raise ValueError(f"lr must be positive and finite, got {self.lr}")
        if not (self.clip_coef > 0 and self.max_grad_norm > 0):  # inf: no clipping
            raise ValueError("clip_coef and max_grad_norm must be positive")
        if self.epochs < 1 or self.minibatches < 1:
            raise ValueError("epochs and minibatches must be at least 1")
        if not (0 <= self.gamma <= 1 and 0 <= self.gae_lambda <= 1):
            raise ValueError("gamma and gae_lambda must lie in [0, 1]")
        coefs = (self.ent_coef, self.vf_coef, self.graph_cost, self.signal_coef,
                 self.recall_coef)
        if not all(0 <= c < math.inf for c in coefs):
            raise ValueError("ent_coef, vf_coef, graph_cost, signal_coef and recall_coef must "
                             "be non-negative and finite")


@dataclass
class TrainConfig:
    """A run of the centralized trainer, and the part of a federated run that says what is
    trained: environment, models, PPO, privacy and the budget in environment steps."""

    env: str = "speaker_listener"
    env_kwargs: dict = field(default_factory=dict)
    num_envs: int = 512
    env_steps: int = 10_000_000
    time_budget: float | None = None  # seconds of training; stops early when reached
    seed: int = 0
    device: str = "auto"  # auto, cpu, cuda or cuda:N (fedcomm.device)
    anneal_lr: bool = True
    eval_every: int = 25  # iterations between greedy evaluations (0: only at the end)
    eval_episodes: int = 1000
    team: TeamConfig = field(default_factory=TeamConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)

    def __post_init__(self) -> None:
        # A configuration from elsewhere (a run directory, the server's) is checked as the
        # flags are: a run that cannot be run is refused before it starts.
        if min(self.num_envs, self.env_steps, self.eval_episodes) < 1:
            raise ValueError("num_envs, env_steps and eval_episodes must be at least 1")
        if self.eval_every < 0 or self.seed < 0:
            raise ValueError("eval_every and seed must be non-negative")
        if self.time_budget is not None and not 0 < self.time_budget < math.inf:
            raise ValueError("time_budget must be positive and finite")

    @property
    def spec(self) -> EnvSpec:
        return env_spec(self.env, self.env_kwargs)

    @property
    def batch_steps(self) -> int:
        """Environment steps of one episode batch (one iteration of the centralized trainer)."""
        return self.num_envs * self.spec.episode_length

    @property
    def optimizer_steps(self) -> int:
        """The most optimizer steps one episode batch's update takes: PPO's epochs times its
        minibatches or, under DP-SGD, times the steps of one DP-SGD epoch
        (``releases.schedule.dp_steps``), whichever is more."""
        per_epoch = self.ppo.minibatches
        if self.privacy.update_noise_multiplier is not None:
            rate = self.privacy.update_sample_rate or 1.0 / self.ppo.minibatches
            per_epoch = max(per_epoch, round(1 / rate))
        return self.ppo.epochs * per_epoch

    def step_reach(self, batches: int) -> float:
        """The furthest an honest agent's optimizer moves one parameter in ``batches`` episode
        batches: Adam's bound per step times the learning rate (never above ``ppo.lr``) times
        the steps."""
        return adam_step_bound() * self.ppo.lr * self.optimizer_steps * batches * (1 + 1e-6)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """From ``to_dict`` output, or a run directory's ``config.json``; a setting it does not
        know is refused by name."""
        d = dict(d)
        parts = {"team": TeamConfig, "ppo": PPOConfig, "privacy": PrivacyConfig}
        made = {name: _of(kind, d.pop(name, {}), f"train.{name}")
                for name, kind in parts.items()}
        _known(cls, d, "train")
        return cls(**made, **d)


Strategy = Literal["fedavg", "fedavgm", "fedadam"]
OnFailure = Literal["stop", "continue"]
STRATEGIES: tuple[str, ...] = ("fedavg", "fedavgm", "fedadam")
Aggregation = Literal["mean", "median", "trimmed_mean", "krum", "multikrum", "bulyan"]
AGGREGATIONS: tuple[str, ...] = ("mean", "median", "trimmed_mean", "krum", "multikrum", "bulyan")
# What of the shared module an agent sends: every part, the parts it shares with another
# agent, the parts it shares with another agent of its type (each type its own copy), or
# nothing (every agent keeps its own copy: the server aggregates nothing).
SHARES: tuple[str, ...] = ("all", "used", "senders", "role", "none")


@dataclass
class FederationConfig:
    """A federated run: what is trained (``train``), and how its rounds are federated. A round
    is ``batches_per_round`` episode batches per agent."""

    train: TrainConfig = field(default_factory=TrainConfig)
    batches_per_round: int = 8  # episode batches each agent trains on between aggregations
    strategy: Strategy = "fedavg"
    server_lr: float = 1.0  # FedAvgM's and FedAdam's server learning rate
    server_momentum: float = 0.0  # FedAvgM
    # Average each type's private modules among the agents of that type too (off: they never
    # leave their agent); with share="senders", only the senders' (their whole models). The
    # server then sees those networks: in a private run they train under DP-SGD.
    aggregate_private: bool = False
    # Which parts of the shared module an agent sends: "all"; "used", each part only among
    # the agents that use it (the encoder among senders; gate, decoder and graph among
    # receivers), and a part only one agent uses stays with it, released to nobody; "role",
    # the same among the agents of one type (each type its own copy: sensors with sensors,
    # across sites); "senders", only the encoder among the senders (each receiver keeps its
    # own receiving parts, so a receiver releases no network); or "none".
    share: str = "all"
    # A round in which an agent fails or does not answer: stop the run, or aggregate the
    # replies that came and go on (the joint environment retries everyone next round).
    on_agent_failure: OnFailure = "stop"
    max_failed_rounds: int = 3  # with "continue": consecutive failed rounds before stopping
    round_timeout: float = 900.0  # seconds for every reply of a round
    node_timeout: float = 120.0  # seconds for every agent's node to be connected
    eval_every: int = 0  # rounds between greedy evaluations; 0: as often as the trainer's
    # A reply whose update (its arrays minus the global module sent) is longer than this L2
    # norm is a failed agent for the round (None: no bound; docs/robustness.md).
    max_update_norm: float | None = None
    aggregation: Aggregation = "mean"  # per key group: FedAvg's mean or a robust rule
    faulty_agents: int = 1  # faulty replies per key group the robust rules are set to withstand
    client_dp_noise: float = 0.0  # client-level DP: noise multiplier of each round's mean; 0 off
    client_dp_clip: float = 1.0  # client-level DP: L2 clip of each agent's update
    # SecAgg+: the server learns only each cohort's sum of updates (server/secure.py); with
    # client_dp_noise, each agent adds its share of the noise (privacy/skellam.py)
    secure_aggregation: bool = False
    # The agents' noise calibrated to this client-level epsilon over the run's rounds (sets
    # client_dp_noise when the run is built; needs secure_aggregation)
    client_dp_epsilon: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.train, dict):
            self.train = TrainConfig.from_dict(self.train)
        if self.batches_per_round < 1:
            raise ValueError("batches_per_round must be at least 1")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r}: use "
                             f"{', '.join(STRATEGIES)}")
        if self.share not in SHARES:
            raise ValueError(f"share must be {', '.join(SHARES[:-1])} or none, "
                             f"got {self.share!r}")
        if self.on_agent_failure not in ("stop", "continue"):
            raise ValueError("on_agent_failure is 'stop' or 'continue'")
        if min(self.round_timeout, self.node_timeout) <= 0:
            raise ValueError("timeouts must be positive")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"unknown aggregation {self.aggregation!r}: use "
                             f"{', '.join(AGGREGATIONS)}")
        if self.max_update_norm is not None and not 0 < self.max_update_norm < math.inf:
            raise ValueError("max_update_norm must be positive and finite")
        if not (0 < self.server_lr < math.inf and 0 <= self.server_momentum < 1):
            raise ValueError("server_lr must be positive and finite, server_momentum in [0, 1)")
        if self.max_failed_rounds < 1 or self.eval_every < 0:
            raise ValueError("max_failed_rounds must be at least 1, eval_every non-negative")
        if self.client_dp_epsilon is not None and not (
                self.secure_aggregation and 0 < self.client_dp_epsilon < math.inf):
            raise ValueError("client_dp_epsilon calibrates the agents' noise under "
                             "secure_aggregation: set both, the epsilon positive and finite")
        if self.faulty_agents < 0 or self.client_dp_noise < 0 or not self.client_dp_clip > 0:
            raise ValueError("faulty_agents and client_dp_noise must be non-negative, "
                             "client_dp_clip positive")

    @property
    def spec(self) -> EnvSpec:
        return self.train.spec

    @property
    def total_batches(self) -> int:
        return max(1, self.train.env_steps // self.train.batch_steps)

    @property
    def rounds(self) -> int:
        return math.ceil(self.total_batches / self.batches_per_round)

    @property
    def eval_interval(self) -> int:
        """Rounds between evaluations: the trainer's interval in batches, rounded up."""
        if self.eval_every:
            return self.eval_every
        if not self.train.eval_every:
            return 0
        return max(1, math.ceil(self.train.eval_every / self.batches_per_round))

    def batches_in(self, server_round: int) -> range:
        """The (1-based) global batch numbers of a round: the last round may be shorter."""
        first = (server_round - 1) * self.batches_per_round + 1
        return range(first, min(first + self.batches_per_round, self.total_batches + 1))

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> FederationConfig:
        """From ``to_dict`` output, or a run directory's ``config.json`` (which adds ``mode``);
        a setting it does not know is refused by name."""
        d = {k: v for k, v in d.items() if k != "mode"}
        _known(cls, d, "")
        return cls(**d)

    @classmethod
    def from_json(cls, text: str) -> FederationConfig:
        return cls.from_dict(json.loads(text))


def _known(cls: type, d: dict, where: str) -> None:
    """Refuse settings ``cls`` does not have, naming them (a configuration from elsewhere, the
    server's included, may carry anything)."""
    unknown = sorted(set(d) - {f.name for f in fields(cls)})
    if unknown:
        names = ", ".join(f"{where}.{k}" if where else k for k in unknown)
        raise ValueError(f"unknown setting{'s' if len(unknown) > 1 else ''} {names}")


def _of(cls: type, d: dict, where: str):
    if not isinstance(d, dict):
        raise ValueError(f"{where} must be an object, got {type(d).__name__}")
    _known(cls, d, where)
    return cls(**d)
