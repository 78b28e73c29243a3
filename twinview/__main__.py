"""``python -m twinview`` is the ``twinview`` command."""

from twinview.cli import main

raise SystemExit(main())
