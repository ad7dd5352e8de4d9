"""``python -m heel``: the command line (see :mod:`heel.cli`)."""

from .cli import console

console()
