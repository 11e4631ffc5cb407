"""Model backends behind small interfaces, each loading a hub id or a local path."""
