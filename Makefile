# Two commands on a fresh machine (see README): `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install demo test test-fast lint bench bench-http loadtest compose-smoke clean

$(BIN)/activate:
	$(PY) -m venv $(VENV)

# torch first, from the local CPU wheel: a bare `torch` requirement would pull a CUDA build.
$(VENV)/.installed: pyproject.toml | $(BIN)/activate
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,cluster]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/jointpq demo

# the whole suite, slow tests included: what CI runs
test: install
	$(BIN)/python -m pytest -q --durations=15

# the edit-run loop: everything not marked slow (no training, no demo artifacts, no locust/schemathesis)
test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

lint: install
	$(BIN)/ruff check .

bench: install
	$(BIN)/python bench/search.py

# HTTP load benchmark (locust headless against `jointpq serve`): needs the demo artifact
bench-http: install
	$(BIN)/jointpq demo --no-serve
	$(BIN)/python bench/http_load.py --root artifacts/demo --mix text --users 32 --workers 1 2

# locust against a running service (HOST=http://127.0.0.1:8000 by default)
HOST ?= http://127.0.0.1:8000
loadtest: install
	$(BIN)/locust -f loadtest/locustfile.py --headless -u 32 -r 32 -t 30s --host $(HOST)

# the compose stack for real (needs root): engine, local bases, images, trainer -> replicas -> locust
compose-smoke: install
	bash docker/smoke.sh

clean:
	rm -rf $(VENV) artifacts
