"""``python -m microattn ...``: the same as the ``microattn`` command."""

from .cli import main

raise SystemExit(main())
