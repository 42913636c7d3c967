import sys
from pathlib import Path

# The run helpers are shared with the example and distributed tests
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
