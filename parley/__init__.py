"""Parley as an installed command (`parley serve|client|cluster`: parley/cli.py), and where its files are.

`pip install .` puts the web app's files and the nginx files inside this package (setup.cfg maps `static/` and
`nginx/` to `parley/static` and `parley/nginx`); in a checkout of the repository they sit beside it.
"""
from pathlib import Path

_HERE = Path(__file__).resolve().parent


def resource(name):
    """The directory `static` or `nginx`, installed or in the repository."""
    installed = _HERE / name
    return installed if installed.is_dir() else _HERE.parent / name
