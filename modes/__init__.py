"""Ways to run the system on one machine: the centralized reference trainer and the federated
simulation, and the child processes and the finished run they share with a deployment."""
