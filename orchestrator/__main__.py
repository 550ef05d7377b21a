"""`python -m orchestrator ...` is the same as `driftsweep ...`."""

from orchestrator.cli import app

app(prog_name="driftsweep")
