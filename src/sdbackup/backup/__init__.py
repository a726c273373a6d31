"""sdbackup backup layer."""
