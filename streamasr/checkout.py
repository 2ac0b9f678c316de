"""Where a source checkout keeps what the package does not ship (the model repository,
the backends folder, the bundled recordings): the folder above the package.  In a
non-editable install this folder is site-packages' parent and holds none of them; the
modules that read it say how to point elsewhere."""

from __future__ import annotations

from pathlib import Path

#: The checkout's root (the folder holding streamasr/).
ROOT = Path(__file__).resolve().parent.parent
