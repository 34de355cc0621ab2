"""The `histocsc` command: one sub-command per stage, plus `demo`; one module per command
group, each registering its commands on the app in cli/app.py (imported here in the
order `histocsc --help` lists them)."""

# isort: off
from histocsc.cli import tiles  # noqa: F401
from histocsc.cli import phantom  # noqa: F401
from histocsc.cli import register  # noqa: F401
from histocsc.cli import prepare  # noqa: F401
from histocsc.cli import train  # noqa: F401
from histocsc.cli import features  # noqa: F401
from histocsc.cli import predict  # noqa: F401
from histocsc.cli import serve  # noqa: F401
from histocsc.cli import evaluate  # noqa: F401
from histocsc.cli import demo  # noqa: F401
from histocsc.cli import config  # noqa: F401
# isort: on
from histocsc.cli.app import app, run

__all__ = ["app", "run"]
