"""d3n: bring the semantics of a diffusion model into an edge-sized defect detector (D3N).

The top-level package is light on purpose: importing it pulls no torch, so the edge runtime
(`d3n.runtime`) stays importable with only the `runtime` extra installed.
"""

__version__ = "0.1.0"
