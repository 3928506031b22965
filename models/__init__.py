"""The agents' models: per-type private networks and the shared communication module."""
