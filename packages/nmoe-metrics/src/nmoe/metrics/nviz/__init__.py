"""NVIZ: nmoe's web dashboard, served by `nmoe-metrics serve` (Starlette + uvicorn, Plotly from its wheel)."""
