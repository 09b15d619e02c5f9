# TuneForge developer entry points. Everything runs inside .venv.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
export PATH := $(abspath $(VENV))/bin:$(PATH)
export HF_HUB_OFFLINE := 1

PROTO_FILES := $(shell find protos -name '*.proto' | sort)
GEN_DIR := services/common

STAMP := $(VENV)/.tuneforge-installed
PACKAGES := services/common services/catalog services/jobs services/gateway services/trainer services/cli

# The web dashboard (dashboard/, Vite + TypeScript) builds into the gateway package, which serves it at /.
WEB_BUILD := services/gateway/tuneforge_gateway/web/index.html
DASHBOARD_SRC := $(shell find dashboard/src -type f) $(addprefix dashboard/,index.html package.json package-lock.json tsconfig.json vite.config.ts)

.PHONY: install dashboard up test protos check-protos lint clean docs reliability bench

install: $(STAMP) $(WEB_BUILD)

dashboard: $(WEB_BUILD)

# Rebuilt only when its sources changed; npm ci installs exactly the committed package-lock.json.
$(WEB_BUILD): $(DASHBOARD_SRC)
	cd dashboard && npm ci --no-audit --no-fund && npm run build

# torch first, pinned to the CPU build on disk; the trainer's own requirement is a range that admits it.
$(STAMP): requirements-dev.txt $(addsuffix /pyproject.toml,$(PACKAGES))
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -r requirements-dev.txt
	$(PIP) install -q $(addprefix -e ,$(PACKAGES))
	touch $@

up: install
	$(VENV)/bin/tuneforge up

test: install
	$(PY) -m pytest

# The reliability and security suite at full scale (tests/reliability with TUNEFORGE_RELIABILITY=full: 10 agent kills,
# a 30 s NATS outage, 10 minutes of load, ...); `make test` runs the same tests small. Writes
# .tuneforge/reliability/report.{json,md} and refreshes the figures in docs/reliability.md.
RELIABILITY_REPORT := .tuneforge/reliability/report.json
reliability: install
	rm -f $(RELIABILITY_REPORT)
	TUNEFORGE_RELIABILITY=full TUNEFORGE_RELIABILITY_REPORT=$(RELIABILITY_REPORT) $(PY) -m pytest tests/reliability -p no:cacheprovider || true
	$(PY) tools/reliability_report.py $(RELIABILITY_REPORT) --docs docs/reliability.md

# Every benchmark under bench/, one after another (under 15 minutes here): .tuneforge/bench/results.{json,md}, and
# the results table in docs/performance.md.
bench: install
	$(PY) bench/run_all.py --docs docs/performance.md

protos:
	rm -rf $(GEN_DIR)/tuneforge
	$(PY) -m grpc_tools.protoc -I protos --python_out=$(GEN_DIR) --grpc_python_out=$(GEN_DIR) \
		--mypy_out=$(GEN_DIR) --mypy_grpc_out=$(GEN_DIR) $(PROTO_FILES)
	find $(GEN_DIR)/tuneforge -type d -exec touch {}/__init__.py \;

# Fails when the committed generated code differs from what `make protos` produces.
check-protos: protos
	git add -N $(GEN_DIR)/tuneforge
	git diff --exit-code --stat -- $(GEN_DIR)/tuneforge

# The reference docs generated from the code: docs/configuration.md, docs/api/{grpc.md,openapi.json,rest.md}.
# tests/unit/test_docs.py fails when the committed ones are stale.
docs: install
	$(PY) tools/gen_docs.py

lint:
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy services/common/tuneforge_common services/catalog/tuneforge_catalog services/jobs/tuneforge_jobs \
		services/gateway/tuneforge_gateway services/trainer/tuneforge_trainer services/cli/tuneforge_cli

clean:
	rm -rf $(VENV) .tuneforge
