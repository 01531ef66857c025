"""The experiment's report (placeholder until the statistics land): which cells finished."""

from __future__ import annotations

from d3n.artifacts import write_json
from d3n.experiment.runner import finished_cells
from d3n.experiment.spec import ExperimentConfig


def write_experiment_report(exp: ExperimentConfig) -> dict:
    cells = finished_cells(exp)
    write_json(exp.out / "experiment.json", {"cells": cells})
    return cells
