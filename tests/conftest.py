import os
import sys

# the repo root (model.py, data.py, ...) on sys.path, however pytest is started
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
