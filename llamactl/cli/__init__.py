"""The command-line interface: a Typer root plus one module per subcommand."""
