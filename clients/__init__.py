"""The agent: its runtime under a privacy budget, rollouts, PPO and DIAL feedback over a
transport, its Flower ClientApp and its durable state."""
