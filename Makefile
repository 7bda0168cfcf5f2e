# spotforge: one entry point for people and CI. `make test` on a fresh clone sets everything up.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CDK := node_modules/.bin/cdk
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export CDK_DISABLE_CLI_TELEMETRY := true
export JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION := 1
export JSII_SILENCE_WARNING_DEPRECATED_NODE_VERSION := 1
export CDK_DISABLE_VERSION_CHECK := true
export JSII_SILENCE_WARNING_UNTESTED_NODE_VERSION := 1

.PHONY: setup synth drill test lint bench deploy destroy clean

setup: $(VENV)/.installed node_modules/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

node_modules/.installed: package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

synth: setup
	$(CDK) synth --quiet --no-notices $(CDK_ARGS)
	@echo "template: $(CURDIR)/cdk.out/$$($(PY) -c 'import json;print(json.load(open("cdk.json"))["context"].get("stackName","spotforge"))').template.json"

# The offline recovery drill: the real controller and node agent against the strict emulator.
drill: setup
	$(PY) -m drill $(DRILL_ARGS)

# Benchmarks (not tests): handler import time and asset size; SQLite snapshot speed.
bench: setup
	$(PY) bench/lambda_bench.py
	$(PY) bench/snapshot_bench.py $(BENCH_ARGS)

test: setup
	$(PY) -m pytest -n 2 $(PYTEST_ARGS)

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	shellcheck -x userdata/*.sh userdata/lib/*.sh userdata/bin/spotforge-agent .ci/run
	$(VENV)/bin/vermin --no-tips --violations -t=3.9- userdata/agent

deploy: setup
	$(CDK) deploy --require-approval broadening $(CDK_ARGS)

destroy: setup
	$(CDK) destroy $(CDK_ARGS)

clean:
	rm -rf cdk.out .pytest_cache .ruff_cache
