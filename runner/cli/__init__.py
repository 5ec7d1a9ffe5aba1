"""The command line: Typer commands over the runner's library, and the only room that prints.

``main`` is the console-script entry; ``run`` holds submit, watch and retry, ``manage`` the
commands that read or tidy runs (status, logs, combine, cancel, runs, rm, prune, doctor, report),
``common`` the app, the consoles, the shared options and the exit codes, ``progress`` the live
progress line and the tables. Only this room imports typer or rich. The package imports nothing,
so that ``runner.cli.main`` alone decides what loads.
"""
