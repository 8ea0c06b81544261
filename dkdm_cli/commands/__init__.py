"""One module per CLI command group; `dkdm_cli.cli` registers them on the Typer app."""
