"""Serving a registered VideoLights model over HTTP with Ray Serve (`python -m jobs.serve`).

- `model.py`    which registry version answers, loaded through MLflow's public pyfunc API
- `requests.py` JSON request bodies -> validated samples, or a 4xx error naming the field
- `catalog.py`  the videos of a served data set (shards), for the page and by-video predict
- `app.py`      the Ray Serve deployment (FastAPI routes, @serve.batch) and its builder
- `page/`       the web page served at `/` (plain HTML + script, no build step)
- `__main__.py` the CLI: preflight, deploy, follow, shut down
"""
