# YinDian: `make run` (a demonstration business day on SQLite) and `make test`.
# Both start from nothing but Python 3.11 and make: `make setup` builds .venv.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PROTOS := $(wildcard protos/yindian/v1/*.proto)
GEN_STAMP := yindian/v1/.generated

# The generated protobuf package yindian/v1 for the in-tree run (the wheel build makes its own: setup.py).
define GENERATE
	rm -rf yindian
	mkdir -p yindian/v1
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=. --grpc_python_out=. --pyi_out=. $(PROTOS)
	touch yindian/__init__.py yindian/v1/__init__.py $(GEN_STAMP)
endef

.PHONY: setup proto test run lint buf-lint buf-breaking bench bench-core bench-ratio bench-feed bench-recon bench-branch bench-pay clean

setup: $(VENV)/.installed $(GEN_STAMP)

$(VENV)/.installed: requirements.txt pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	# The project itself, editable: the checkout is what runs, the console scripts (yindian-mis-adapter,
	# yindian-bridge, yindian-bank-sim) are in .venv/bin. yindian/v1 is generated first so the install maps it.
	rm -f "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/yindian-repo.pth"
	$(GENERATE)
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

proto: $(VENV)/.installed
	$(GENERATE)

$(GEN_STAMP): $(PROTOS) $(VENV)/.installed
	$(MAKE) proto

# Three workers: most tests wait on processes, fsync and sockets, not on the 2 cores. worksteal: an idle worker
# takes queued tests from a busy one, so the tests queued behind a long one (the chaos soak) do not wait for it.
# --durations: the slowest tests named in every run (CI's log too), to keep the suite under its 15 minutes.
PYTEST_ARGS ?= -n 3 --dist worksteal --durations=15

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

run: setup
	$(PY) -m bank_sim demo-day

lint: setup
	$(PY) -m ruff check .
	$(PY) -m mypy
	$(VENV)/bin/lint-imports   # layer contracts: [tool.importlinter] in pyproject.toml

buf-lint:
	cd protos && npx --yes @bufbuild/buf@1.75.0 lint

# Additive changes only: the protos must stay wire- and source-compatible with
# main's (override with BUF_AGAINST, e.g. '.git#tag=v1.2,subdir=protos').
BUF_AGAINST ?= .git\#branch=main,subdir=protos
buf-breaking:
	npx --yes @bufbuild/buf@1.75.0 breaking protos --against '$(BUF_AGAINST)'

bench-core: setup
	$(PY) -m bank_sim bench-core $(BENCH_ARGS)

bench-ratio: setup
	$(PY) -m bank_sim bench-ratio $(BENCH_ARGS)

bench-branch: setup
	$(PY) -m bank_sim bench-branch $(BENCH_ARGS)

bench-feed: setup
	$(PY) -m bank_sim bench-feed $(BENCH_ARGS)

bench-recon: setup
	$(PY) -m mis_adapter bench-recon $(BENCH_ARGS)

bench-pay: setup
	$(PY) -m mis_adapter bench-pay $(BENCH_ARGS)

bench: setup
	$(PY) -m bank_sim bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) yindian var build *.egg-info .pytest_cache .mypy_cache .ruff_cache
