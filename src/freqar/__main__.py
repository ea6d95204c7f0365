"""``python -m freqar`` = the ``freqar`` command."""

from .cli import main

raise SystemExit(main())
