"""Joint environments: batched, seeded, with scripted references."""
