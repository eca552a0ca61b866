"""The CLI's commands, one module each; :data:`saekit.cli.COMMANDS` lists them.

Every command module exposes the same two functions: ``add_parser(subparsers)`` adds its
parser(s) (flags, help) with ``set_defaults(func=run)``, and ``run(args) -> int`` runs it and
returns the exit status. A module imports nothing heavy at module level (``saekit --help`` must
answer without torch): ``run`` imports what it needs. Flags several commands share are in
:mod:`saekit.commands.flags`.
"""
