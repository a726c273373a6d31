"""sdbackup meta layer."""
