"""The learning core every mode shares: PPO and DP-SGD over episode batches, rollouts through a
transport, DIAL feedback, and a party's training; the centralized trainer and each federated
agent run it."""
