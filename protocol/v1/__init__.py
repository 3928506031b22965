"""Generated stubs of the fedcomm.v1 wire protocol (see ``joint_env.proto``)."""
