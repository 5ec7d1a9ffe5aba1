"""The cdktf app (``cdktf.json``): build the stack and synthesize it."""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script, `python3 infra/main.py`, by the cdktf CLI
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cdktf import App

from infra.stack import CflowStack

app = App()
CflowStack(app)
app.synth()
