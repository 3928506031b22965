"""fedcomm.server."""
