"""The `revdeq` command line: one Typer app, one module per command. No maths lives here."""
