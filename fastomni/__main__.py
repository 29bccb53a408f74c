"""``python -m fastomni``: the ``fastomni`` command."""
import sys

from fastomni.cli import main

sys.exit(main())
