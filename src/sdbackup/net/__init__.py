"""sdbackup net layer: the cluster protocol (frames, handshake, RPC) and its clients."""
