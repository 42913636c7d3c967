import sys
from pathlib import Path

# The run helpers (tests/examples) and the decoders' references (tests/inference) are shared with these tests
TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS / "examples"))
sys.path.insert(0, str(TESTS / "inference"))
