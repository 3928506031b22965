"""What secure aggregation adds to the wire: Flower's SecAgg+ stage messages (its own records,
``secaggplus_mod``'s and ``SecAggPlusWorkflow``'s) marked with the round they sum, and the
SecAgg+ settings every agent expects of the server."""

from __future__ import annotations

ROUND = "fedcomm.secure-round"  # a stage message's ConfigRecord: {"round": r}
MAX_WEIGHT = 1000.0  # SecAgg+'s max_weight: every input weighs it, so the sum is uniform
MODULUS = 2**32  # SecAgg+'s modulus_range (Flower's default): masks and sums live modulo it
