"""fedcomm.protocol."""
