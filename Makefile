# Set-up and everyday commands. `make demo` and `make test` work on a fresh machine with Python 3.10+.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
RUN    := runs/demo

.PHONY: venv demo test test-fast shards benchmarks clean

venv: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

shards: venv
	$(PY) shards/build.py digits

demo: shards
	$(VENV)/bin/gensuite train jobs/demo.yaml --run-dir $(RUN)
	$(VENV)/bin/gensuite report $(RUN)
	@echo
	@echo "samples:      $(RUN)/samples/   (latest grid: $$(ls $(RUN)/samples/samples-*.png | tail -n 1))"
	@echo "checkpoints:  $(RUN)/checkpoints/"
	@echo "tensorboard:  $(RUN)/tb/"
	@echo "report:       $(RUN)/report/index.md (curves, sample GIF, metrics table)"
	@echo "view it with: $(VENV)/bin/tensorboard --logdir $(RUN)/tb"

test: venv
	$(PY) -m pytest -q --durations=10

test-fast: venv
	$(PY) -m pytest -q -m "not slow"

benchmarks: shards
	$(PY) benchmarks/loop_overhead.py
	$(PY) benchmarks/data_throughput.py
	$(PY) benchmarks/eval_speed.py --inception-n 500

clean:
	rm -rf runs .pytest_cache
