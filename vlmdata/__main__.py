"""`python -m vlmdata` runs the CLI."""

from vlmdata.cli import app

app()
