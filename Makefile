# The README's two commands: `make test` and `make demo`. Everything else is a helper.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

export RAY_USAGE_STATS_ENABLED := 0
export RAY_USAGE_STATS_REPORT_URL := http://127.0.0.1:9/
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := true
export AWS_EC2_METADATA_DISABLED := true

.PHONY: venv browser test lint demo bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

# tests/test_serve.py drives Debian's chromium through its chromedriver. Installed here when
# missing (CI runs as root); where that cannot be done the browser test skips and says why.
browser:
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing chromium + chromium-driver (apt-get) for the browser test"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	      chromium chromium-driver >/dev/null) || echo "apt-get failed: the browser test will skip"; \
	  else \
	    echo "chromium/chromedriver missing and no root apt-get: the browser test will skip"; \
	  fi; \
	fi

test: $(STAMP) browser
	$(PY) -m ruff check .
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder

lint: $(STAMP)
	$(PY) -m ruff check .

demo: $(STAMP)
	$(PY) -m cluster.local.demo

clean:
	rm -rf $(VENV) .pytest_cache
