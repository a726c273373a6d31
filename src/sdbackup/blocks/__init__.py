"""sdbackup blocks layer."""
