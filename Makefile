# Two commands set up everything on a fresh machine:
#   make run   — create .venv, install, start the app on the built-in sample zoo
#   make test  — install test dependencies (Debian's chromium too), run the whole suite
# and, after either: `make shell` (a shell with the `soup` command) and `make run PORT=8600`.
PYTHON ?= python3
PORT ?= 8501
HOST ?= 127.0.0.1
VENV := .venv
PY := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: run test test-fast mutate screenshots install test-deps chromium bench zoos shell clean

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

$(VENV)/.test-installed: $(VENV)/.installed requirements-test.txt
	$(PY) -m pip install -q -r requirements-test.txt
	touch $@

install: $(VENV)/.installed

test-deps: $(VENV)/.test-installed chromium

# Playwright cannot download its own browser here: end-to-end tests drive Debian's chromium.
chromium:
	@if [ ! -x /usr/bin/chromium ]; then \
		$(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	fi

# HOST=0.0.0.0 serves the local network (a workshop); the default serves this machine only.
run: $(VENV)/.installed
	@if [ "$(HOST)" != "127.0.0.1" ]; then \
		echo "Participants open: http://$$(hostname -I 2>/dev/null | cut -d' ' -f1 || hostname):$(PORT)"; fi
	$(VENV)/bin/streamlit run app.py --server.port $(PORT) --server.address $(HOST)

# A shell whose PATH has the venv's `soup` (same as `. .venv/bin/activate`); exit to leave it.
shell: $(VENV)/.installed
	@echo "soup is on your PATH in this shell; type exit to leave it"
	@VIRTUAL_ENV="$(abspath $(VENV))" PATH="$(abspath $(VENV))/bin:$$PATH" $${SHELL:-/bin/sh} -i

test: test-deps
	$(PY) -m pytest

# The inner loop: everything but the slow and the browser tests (make test runs the whole suite).
test-fast: test-deps
	$(PY) -m pytest -m "not slow and not e2e"

# docs/screenshots (the README shows the 1400-wide ones): from the Chromium test that checks every
# page's and Tour step's figures at 1400×1000 and 1024×768, full-page screenshots of each.
screenshots: test-deps
	rm -rf test-artifacts/screenshots
	$(PY) -m pytest -q -p no:cacheprovider tests/test_app.py -k two_window_sizes
	@test "$$(ls test-artifacts/screenshots/*.png 2>/dev/null | wc -l)" -eq 28 || \
		{ echo "the Chromium test made no screenshots (is /usr/bin/chromium there?): docs/screenshots kept"; exit 1; }
	rm -f docs/screenshots/*.png
	cp test-artifacts/screenshots/*.png docs/screenshots/

# Mutation testing of the core computations (pyproject.toml's [tool.mutmut]); slow, so not in CI.
# Prints a table per module and every surviving mutant, sorted by what it changed; run it before
# releasing a recipe. One OpenMP thread per mutant:
# mutmut forks each mutant from a process whose OpenMP pool already ran, and a forked pool spins
# until mutmut's CPU-time limit, which would report most mutants as timed out.
mutate: $(VENV)/.test-installed
	$(PY) -m pip install -q mutmut==3.8.1
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(VENV)/bin/mutmut run --max-children 2 || true
	$(PY) bench/mutation_report.py --list

bench: $(VENV)/.test-installed
	$(PY) -m pip install -q -r requirements-bench.txt
	$(PY) bench/bench_angles.py
	$(PY) bench/bench_greedy.py
	$(PY) bench/bench_landscape.py
	$(PY) bench/bench_app.py

zoos: $(VENV)/.installed
	$(PY) -m sample_data.build

clean:
	rm -rf $(VENV) .pytest_cache
