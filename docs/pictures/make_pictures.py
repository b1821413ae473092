"""Regenerate every picture of the docs into this folder (docs/pictures/):

    PYTHONPATH=. python docs/pictures/make_pictures.py

Same as ``python -m microattn.demo.pictures docs/pictures``. Needs matplotlib (the ``plot``
extra) and numba-cuda (the ``cuda`` extra, no GPU) for the rung-2 picture;
tests/demo/test_pictures.py checks they build and that this folder holds exactly them.
"""

import sys
from pathlib import Path

from microattn.demo.pictures import main

if __name__ == "__main__":
    sys.exit(main([str(Path(__file__).resolve().parent)]))
