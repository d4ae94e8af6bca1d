"""``python -m xencr.cli``: the same as the ``xencr`` console script."""

from xencr.cli.app import main

main()
