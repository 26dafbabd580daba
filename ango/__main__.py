"""``python -m ango``: the same as the ``ango`` command."""

from ango.cli import main

main()
