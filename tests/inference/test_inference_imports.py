"""Imports run one way: `soft_peft.inference` needs neither the data loaders nor the evaluation package."""

import subprocess
import sys

# Load every module of soft_peft.inference without running soft_peft/__init__.py (which imports the whole library),
# so only what inference itself imports ends up in sys.modules
_PROBE = """
import importlib.util, sys, types
spec = importlib.util.find_spec("soft_peft")
package = types.ModuleType("soft_peft")
package.__path__ = list(spec.submodule_search_locations)
sys.modules["soft_peft"] = package
import importlib, pkgutil, soft_peft.inference
for module in pkgutil.iter_modules(soft_peft.inference.__path__, "soft_peft.inference."):
    importlib.import_module(module.name)
print(" ".join(sorted(name for name in sys.modules if name.startswith("soft_peft"))))
"""


def test_inference_imports_neither_data_nor_evaluation():
    result = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, check=True)
    loaded = result.stdout.split()
    assert "soft_peft.inference.speculative" in loaded  # the probe did import the decoders
    assert not [name for name in loaded if name in ("soft_peft.data", "soft_peft.evaluation")], loaded
    assert not [name for name in loaded if name.startswith(("soft_peft.evaluation.", "soft_peft.cli"))], loaded
