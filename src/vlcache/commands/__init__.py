"""The CLI's commands, one module each: cli.py parses the arguments and calls a module's run_* function.

Each runs the command in this process (loading the model) or, with --server, through remote.py."""
