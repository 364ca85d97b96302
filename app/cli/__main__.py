"""``python -m app.cli``: the same as the ``cxr`` console script."""
from app.cli import main

main()
