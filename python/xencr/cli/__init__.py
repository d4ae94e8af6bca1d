"""The `xencr` command line (Typer): one module per command group."""
