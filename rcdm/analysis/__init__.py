"""The analyses of what an embedding keeps. Each is one module of this package (``NAME``, ``Options``,
``run(inputs, options) -> Result``, see ``rcdm.analysis.base``); the table below is the only list of them:
``launch/analyze.py analysis=<name>``, a training job's end-of-run evaluation and the demo findings all take
their analyses from it. A new analysis is one module and one line here."""
import importlib

ANALYSES = {name: importlib.import_module(f"rcdm.analysis.{name}") for name in (
    "interpolate",
    "variability",
    "faithfulness",
    "manipulate",
    "invariance",
    "adversarial",
    "fidelity",
    "factor_reads",
)}
