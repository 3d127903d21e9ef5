"""One module per `varmoe` subcommand; each defines `register(subparsers)` and `run(args)`."""
