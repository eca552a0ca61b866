"""The CLI's longer commands, one module each (saekit.cli parses the arguments)."""
