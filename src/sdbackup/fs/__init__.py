"""sdbackup fs layer."""
