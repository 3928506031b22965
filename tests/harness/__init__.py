"""What the tests start and stop, in one place; each module's docstring says what it starts
and how it is stopped.

- ``processes``: ``fedcomm`` command lines as child processes (``fedcomm``, ``simulate``,
  ``deploy``, ``fedcomm sim serve``), waiting for them, and finding what a run left behind.
- ``sim``: the simulator service in this process (``SimServer``) with a one-sensor,
  one-processor, one-actuator factory, and agents that speak to it on raw stubs or as
  ``Party`` over ``GrpcTransport``.
- ``grids``: Flower's grid as the server's round loop uses it, answered by functions or by real
  ClientApps; ``FederatedRun``, every party of a run in this process.
- ``secrets``: an agent's tokens, server keys and node settings, and a throwaway PKI.
- ``replies``: replies signed as an agent's ClientApp signs them.

Pytest fixtures stay in ``tests/conftest.py``, which delegates to these.
"""
