"""The `dostream` command: `main.py` maps each subcommand to its module here (imported lazily); every
subcommand module defines `cli_main(argv) -> int`."""
