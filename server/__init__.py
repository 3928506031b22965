"""The coordinator: the Flower ServerApp, its round loop, strategies and checkpoints."""
