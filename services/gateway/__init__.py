"""The gateway: the only public port of the mesh."""
