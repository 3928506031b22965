"""fedcomm: heterogeneous agents that learn to communicate, each a private federated party."""

__version__ = "0.1.0"
