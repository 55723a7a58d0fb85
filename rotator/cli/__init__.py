"""The ``rotator`` command: argument parsing, one module per command group, and the
text it prints. It is the top layer and may import every other part of rotator.

`main` parses (`parser` holds the whole argparse tree and the policy flags), imports
the module of the command run and no other, dispatches and turns errors into exit
codes; `common` has what every command shares (the exit-code errors, the manager
built from settings, ``--keyset`` checks) and `output` the text printed alike.
Each command group has its module: `daemon` (run, dev), `keys` (rotate, revoke,
reseal, repair, kek), `show` (status, jwks, audit, check-config), `keyset` (which
asks the keyset rules of `rotator.core.registration`), `tokens` and `serve`; they do
not import each other, and share `keyset_file`, `timeline` and `usage` above
`common`, `output` and `parser`. A new command: its arguments in `parser`, its
``cmd_*`` function in its group's module, its ``module:function`` in
``main._COMMANDS``.
"""
