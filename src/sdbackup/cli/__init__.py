"""sdbackup cli layer."""
