"""The wire protocols: fedcomm.v1 with the simulator, and the round contract with the server."""
