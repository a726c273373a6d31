"""sdbackup: a shared-disk cluster file system with online, block-level image backup."""

__version__ = "0.1.0"
