import os
import sys

# tests import their model builders (tests/models.py) and the torch-free sample builders.
HERE = os.path.dirname(__file__)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "samples"))
