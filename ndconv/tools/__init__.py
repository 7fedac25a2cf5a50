"""Command-line tools: shape calculator, solver, explainer."""
