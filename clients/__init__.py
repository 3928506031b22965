"""The agents: their models, the communication channel and the PPO update."""
