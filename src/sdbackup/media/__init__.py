"""sdbackup media layer."""
