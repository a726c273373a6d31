"""sdbackup cluster layer."""
