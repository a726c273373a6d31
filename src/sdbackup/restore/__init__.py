"""sdbackup restore layer."""
