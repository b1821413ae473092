"""``python -m microattn ...``: the same as the ``microattn`` command (microattn.demo.cli)."""

from .demo.cli import main

raise SystemExit(main())
