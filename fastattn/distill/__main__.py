"""``python -m fastattn.distill``: see :mod:`fastattn.distill.cli`."""
from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
