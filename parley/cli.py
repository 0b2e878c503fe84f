"""`parley`: the command `pip install .` (or `pipx install .`) installs.

    parley serve [options]       the server, as `make run` starts it (`parley serve --help` lists the options)
    parley client [options]      the terminal client (`make client`)
    parley cluster [options]     a store, three instances and nginx on loopback (`make cluster`)
"""
import runpy
import sys

from parley import resource

COMMANDS = ("serve", "client", "cluster")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(__doc__.strip())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    sys.argv[0] = f"parley {command}"  # what --help and errors call it
    if command == "serve":
        from services.storage.embedded_mongo import start_early
        early = start_early(rest)  # as `python server.py` does: the store starts while the app is imported
        import server
        server.main(rest, early_store=early)
        return 0
    if command == "client":
        import client
        return client.main(rest)
    if command == "cluster":
        cluster = runpy.run_path(str(resource("nginx") / "cluster.py"))
        return cluster["main"](rest)
    print(f"parley: unknown command {command!r} (one of {', '.join(COMMANDS)}; parley --help)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
