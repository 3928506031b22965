"""Running the parties as separate processes: secrets, the Flower app, launchers, manifests."""
