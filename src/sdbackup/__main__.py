"""``python -m sdbackup``: the same as the ``sdbackup`` command."""

from sdbackup.cli.main import main

main()
