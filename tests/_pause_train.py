"""Run the ``negvision`` CLI but stop dead after optimizer step ``NEGVISION_PAUSE_AT_STEP``, so that a test can kill
the process there with SIGKILL (a real, unannounced death part-way through an epoch).

Usage: ``NEGVISION_PAUSE_AT_STEP=N NEGVISION_PAUSE_MARKER=FILE python tests/_pause_train.py detect train ...``;
the marker file appears once step N is done (and any checkpoint due before it is on disk).
"""

import os
import sys
import time
from pathlib import Path

from vision.engine.trainer import Trainer

PAUSE_AT = int(os.environ["NEGVISION_PAUSE_AT_STEP"])
MARKER = Path(os.environ["NEGVISION_PAUSE_MARKER"])
_emit = Trainer._emit


def _emit_then_pause(self, event, info):
    _emit(self, event, info)
    if event == "step_end" and info["step"] == PAUSE_AT:
        MARKER.write_text(str(PAUSE_AT))
        time.sleep(3600)  # the test kills us here


Trainer._emit = _emit_then_pause

if __name__ == "__main__":
    from vision.cli import main

    sys.argv[0] = "negvision"
    main()
