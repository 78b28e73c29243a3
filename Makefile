# One-command set-up: `make demo` runs the main job, `make test` runs ruff and the tests.
# Both create .venv on first use with the test, apps and export extras of pyproject.toml (torch is
# pinned there).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
DEMO_OUT ?= demo_out
export NO_ALBUMENTATIONS_UPDATE := 1

.PHONY: venv test test-slow lint demo screenshots bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e ".[test,apps,export]"
	touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: lint
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow || [ $$? -eq 5 ]

demo: $(STAMP)
	$(VENV)/bin/twinview demo --out $(DEMO_OUT)

# The README's app screenshots: the browser tests run on the demo's models and data (needs `make demo`
# and chromium + chromium-driver).
screenshots: $(STAMP)
	TWINVIEW_DEMO_OUT=$(DEMO_OUT) TWINVIEW_SCREENSHOTS=docs/images $(PY) -m pytest -q -m browser \
		tests/test_browser_apps.py

# Benchmarks (lightly is a benchmark-only extra); tables land in benchmarks/results/.
bench: $(STAMP)
	$(PY) -m pip install --quiet -e ".[bench]"
	$(PY) benchmarks/pretrain_throughput.py
	$(PY) benchmarks/pretrain_quality.py
	$(PY) benchmarks/seg_label_efficiency.py
	$(PY) benchmarks/seg_memory_budget.py
	$(PY) benchmarks/reid_market_mini.py
	$(PY) benchmarks/reid_label_free.py
	$(PY) benchmarks/reid_domain_adaptation.py
	$(PY) benchmarks/reid_eval_speed.py
	$(PY) benchmarks/reid_query_latency.py

clean:
	rm -rf $(DEMO_OUT) .pytest_cache .ruff_cache
