# session-authority: the two commands a new machine needs are `make run` and `make test`.
# Each creates/refreshes .venv and installs what it needs (Python 3.11+ and the registries).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PROMTOOL := $(BIN)/promtool
PORT   ?= 50051
PYTEST_ARGS ?=
# Test processes for `make test` (pytest-xdist; 0: one process, in collection order).
PYTEST_JOBS ?= 2
BENCH_ARGS  ?=
LOCK_ARGS   ?=

.DEFAULT_GOAL := help
.PHONY: help lock run test check lint layers fmt typecheck proto check-generated buf-lint buf-breaking node-client unit contract integration e2e rules h2load bench tls-servers doc-tools pgbouncer gateway-tools clean

help:  ## list targets
	@grep -E '^[a-z0-9.-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-16s %s\n", $$1, $$2}'

# Every install is the lock (uv.lock, every direct and transitive dependency with its hashes):
# plain pip installs uv from .ci/uv-bootstrap.txt (its hashes, taken from the lock), then
# `uv sync --locked` makes .venv exactly the lock, and fails if pyproject.toml and the lock
# disagree (run `make lock`). No Python is downloaded: the venv's interpreter is the machine's.
export UV_PYTHON_DOWNLOADS := never
export UV_PROJECT_ENVIRONMENT := $(abspath $(VENV))
$(BIN)/uv: .ci/uv-bootstrap.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --no-deps --require-hashes -r .ci/uv-bootstrap.txt
	@touch $@

# The second sync and .ci/xds_protos_overlap.py undo what xds-protos' wheel overwrites in
# opentelemetry-proto and googleapis-common-protos (the script says what and why).
XDS_OVERLAP := --reinstall-package opentelemetry-proto --reinstall-package googleapis-common-protos
$(STAMP): pyproject.toml uv.lock $(BIN)/uv .ci/xds_protos_overlap.py
	$(BIN)/uv sync --locked --extra dev --python $(BIN)/python --quiet
	$(BIN)/uv sync --locked --extra dev --python $(BIN)/python --quiet $(XDS_OVERLAP)
	$(BIN)/python .ci/xds_protos_overlap.py
	@touch $(STAMP)

# Needs uv only, not an installed venv: after a pyproject.toml change the lock is stale, and
# `uv sync --locked` (the venv's install) rightly refuses to run until this has.
lock: $(BIN)/uv  ## update uv.lock after a pyproject.toml change (LOCK_ARGS=--upgrade: newest allowed releases), and the uv bootstrap pin
	$(BIN)/uv lock $(LOCK_ARGS)
	$(BIN)/python .ci/uv_bootstrap.py

# promtool, for the alert-rule tests: the one binary, taken from Debian's `prometheus`
# package and put in the venv (no Prometheus server installed, no service started). Uses
# a promtool already on PATH if there is one. Without apt it only says so: the tests that
# need promtool then fail (tests/integration/test_alert_rules.py), they never skip.
$(PROMTOOL): | $(STAMP)
	@set -e; \
	if command -v promtool >/dev/null 2>&1; then ln -sf "$$(command -v promtool)" $@; exit 0; fi; \
	if ! command -v apt-get >/dev/null 2>&1; then \
	  echo "promtool missing and no apt-get: install Prometheus's promtool on PATH; the alert-rule tests fail without it" >&2; \
	  exit 0; fi; \
	tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; chmod 755 "$$tmp"; \
	fetch() { (cd "$$tmp" && apt-get download -qq -o APT::Sandbox::User=root prometheus >/dev/null 2>&1); }; \
	if ! fetch && ! { [ "$$(id -u)" = 0 ] && apt-get update -qq && fetch; }; then \
	  echo "promtool missing: 'apt-get download prometheus' failed (not root? run 'sudo apt-get update' first); the alert-rule tests fail without it" >&2; \
	  exit 0; fi; \
	dpkg-deb --fsys-tarfile "$$tmp"/prometheus_*.deb | tar -xO ./usr/bin/promtool > "$$tmp/promtool"; \
	chmod 755 "$$tmp/promtool"; mv "$$tmp/promtool" $@; \
	echo "installed $$($@ --version 2>&1 | head -1) at $@"

# TLS-capable Redis and Postgres, for the backend TLS tests (tests/integration/test_backend_tls.py):
# the wheels' servers have no TLS. Debian's redis-server (7.x) and postgresql are built with
# OpenSSL; `session_authority.embedded.tls.report` says whether the machine has them (the one
# place that decides), else they are installed with apt-get as root. The tests start their own
# servers from these binaries; nothing else is configured. Without apt (or not root) it only
# says so: those tests then fail, they never skip.
tls-servers: $(STAMP)  ## find or install (apt, as root) a redis-server and a Postgres built with TLS
	@set -e; \
	if $(BIN)/python -c 'from session_authority.embedded.tls import report; raise SystemExit(report())' >/dev/null; then exit 0; fi; \
	if [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then \
	  echo "TLS-capable redis-server/postgres missing: install Debian's redis-server and postgresql (as root); the backend TLS tests fail without them" >&2; \
	  exit 0; fi; \
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server postgresql >/dev/null \
	  || echo "apt-get install redis-server postgresql failed; the backend TLS tests fail without them" >&2; \
	$(BIN)/python -c 'from session_authority.embedded.tls import report; raise SystemExit(report())' || true

# jq, which the docs' commands use (tests/e2e/test_docs_commands.py runs them as written; curl
# and openssl come with the base system): found on PATH, else installed from Debian as root.
# Without apt (or not root) it only says so: that test then fails, it never skips.
doc-tools:  ## find or install (apt, as root) jq, for the docs' commands
	@command -v jq >/dev/null 2>&1 && exit 0; \
	if [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then \
	  echo "jq missing: install Debian's jq (as root); tests/e2e/test_docs_commands.py fails without it" >&2; \
	  exit 0; fi; \
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends jq >/dev/null \
	  || echo "apt-get install jq failed; tests/e2e/test_docs_commands.py fails without it" >&2

# PgBouncer, for the transaction-pooling tests (tests/integration/test_pgbouncer.py): Debian's
# pgbouncer (1.18 on bookworm), found on PATH or in /usr/sbin (`session_authority.embedded.pgbouncer`
# decides), else installed with apt-get as root. The tests start their own pgbouncer process on a
# private port in front of their private Postgres; the package's own service is not used. Without
# apt (or not root) it only says so: those tests then fail, they never skip.
pgbouncer:  ## find or install (apt, as root) Debian's pgbouncer, for the transaction-pooling tests
	@{ command -v pgbouncer || test -x /usr/sbin/pgbouncer; } >/dev/null 2>&1 && exit 0; \
	if [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then \
	  echo "pgbouncer missing: install Debian's pgbouncer (as root); tests/integration/test_pgbouncer.py fails without it" >&2; \
	  exit 0; fi; \
	install() { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends pgbouncer >/dev/null; }; \
	if ! install && ! { apt-get update -qq && install; }; then \
	  echo "apt-get install pgbouncer failed; tests/integration/test_pgbouncer.py fails without it" >&2; \
	  exit 0; fi; \
	echo "installed $$(/usr/sbin/pgbouncer --version | head -1)"
# nginx, for the forward-auth test (tests/e2e/test_gateways.py runs a private nginx with
# auth_request in front of /auth): found on PATH or in /usr/sbin, else Debian's nginx installed
# as root (Debian's policy-rc.d, where present, keeps apt from starting the packaged service; the
# test starts its own, on private ports). Without apt (or not root) it only says so: that test
# then fails, it never skips.
gateway-tools:  ## find or install (apt, as root) nginx, for the forward-auth test
	@{ command -v nginx || test -x /usr/sbin/nginx; } >/dev/null 2>&1 && exit 0; \
	if [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then \
	  echo "nginx missing: install Debian's nginx (as root); tests/e2e/test_gateways.py fails without it" >&2; \
	  exit 0; fi; \
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nginx >/dev/null \
	  || echo "apt-get install nginx failed; tests/e2e/test_gateways.py fails without it" >&2

# The TypeScript client's dependencies (clients/node), exactly its package-lock.json: `npm ci`,
# redone when the lock or package.json changes. Needs Node 20+ and npm; the npm registry (or its cache).
NODE_CLIENT := clients/node
NODE_STAMP  := $(NODE_CLIENT)/node_modules/.installed
$(NODE_STAMP): $(NODE_CLIENT)/package.json $(NODE_CLIENT)/package-lock.json
	cd $(NODE_CLIENT) && npm ci --no-audit --no-fund --loglevel=error
	@touch $@

node-client: $(NODE_STAMP)  ## install the TypeScript client's locked dependencies (npm ci in clients/node)

run: $(STAMP)  ## install, then serve on 127.0.0.1:PORT (default 50051) with a private Postgres and Redis
	$(BIN)/session-authority dev --port $(PORT)

test: $(STAMP) $(NODE_STAMP) $(PROMTOOL) tls-servers doc-tools pgbouncer gateway-tools check  ## install, run every check and every test (PYTEST_JOBS processes, default 2)
	$(BIN)/python -m pytest -n $(PYTEST_JOBS) --dist loadgroup $(PYTEST_ARGS)

check: lint layers typecheck check-generated buf-lint buf-breaking  ## static checks only

lint: $(STAMP)  ## ruff (lint + format check)
	$(BIN)/ruff check server clients tests
	$(BIN)/ruff format --check server clients tests

layers: $(STAMP)  ## import-linter: the layer contract in pyproject.toml [tool.importlinter]
	$(BIN)/lint-imports --no-cache --no-logo

fmt: $(STAMP)  ## apply ruff fixes and formatting
	$(BIN)/ruff check --fix server clients tests
	$(BIN)/ruff format server clients tests

typecheck: $(STAMP)  ## mypy --strict on server, client and test code
	$(BIN)/mypy server/session_authority clients/python tests

proto: $(STAMP) $(NODE_STAMP)  ## regenerate the Python stubs (and descriptors.binpb, for reflection) and the TypeScript code from proto/
	PYTHON=$(abspath $(BIN)/python) proto/generate.sh
	cd $(NODE_CLIENT) && $(abspath $(BIN)/buf) generate ../../proto --template buf.gen.yaml

check-generated: $(STAMP) $(NODE_STAMP)  ## fail if regenerating the stubs (Python, TypeScript) would change them
	@tmp=$$(mktemp -d) && trap 'rm -rf $$tmp' EXIT && \
	PYTHON=$(abspath $(BIN)/python) proto/generate.sh $$tmp >/dev/null && \
	diff -r -x __pycache__ -x '*.typed' $$tmp/session_authority/v1 clients/python/session_authority/v1 && \
	(cd $(NODE_CLIENT) && $(abspath $(BIN)/buf) generate ../../proto --template buf.gen.yaml -o $$tmp/node) && \
	diff -r $$tmp/node/src/gen $(NODE_CLIENT)/src/gen && \
	echo "generated stubs are up to date"

buf-lint: $(STAMP)  ## buf lint (STANDARD rules) on proto/
	cd proto && $(abspath $(BIN)/buf) lint

# The last release's API, as a buf image (proto/released/): the proto may grow, never break
# (buf's FILE rules: no field, message or RPC removed, renumbered, renamed or retyped). Made at a
# release with: git archive <tag> proto | tar -x -C /tmp/rel && (cd /tmp/rel/proto && buf build -o …)
buf-breaking: $(STAMP)  ## buf breaking: proto/ against the last release's (proto/released/v0.2.binpb)
	cd proto && $(abspath $(BIN)/buf) breaking --against released/v0.2.binpb

unit: $(STAMP)  ## unit tests only (no I/O)
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

contract: $(STAMP)  ## port contract suites, on the fakes and on private Redis and Postgres
	$(BIN)/python -m pytest tests/contract $(PYTEST_ARGS)

integration: $(STAMP) $(PROMTOOL) tls-servers pgbouncer  ## integration tests (private Redis and Postgres; promtool for the alert rules; TLS servers; pgbouncer)
	$(BIN)/python -m pytest tests/integration $(PYTEST_ARGS)

e2e: $(STAMP) $(NODE_STAMP) doc-tools gateway-tools  ## end-to-end tests (real server process, grpcurl, nginx, the TypeScript client)
	$(BIN)/python -m pytest tests/e2e $(PYTEST_ARGS)

rules: $(STAMP) $(PROMTOOL)  ## promtool check + test of deploy/observability/prometheus-rules.yml (outage, recovery, keys)
	$(BIN)/python -m pytest tests/integration/test_alert_rules.py $(PYTEST_ARGS)

# h2load, the benchmark's load generator, from Debian's nghttp2-client. Without it (no apt,
# not root) it only says so: the benchmark then drives load from Python (report key
# `load_generator`).
h2load:  ## install h2load (Debian nghttp2-client), the load generator of make bench
	@command -v h2load >/dev/null 2>&1 && exit 0; \
	if ! command -v apt-get >/dev/null 2>&1 || [ "$$(id -u)" != 0 ]; then \
	  echo "h2load missing (no apt-get, or not root): make bench falls back to a Python load generator" >&2; \
	  exit 0; fi; \
	install() { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nghttp2-client >/dev/null; }; \
	if ! install && ! { apt-get update -qq && install; }; then \
	  echo "h2load missing: 'apt-get install nghttp2-client' failed; make bench falls back to a Python load generator" >&2; \
	  exit 0; fi; \
	echo "installed $$(h2load --version)"

bench: $(STAMP) h2load  ## benchmark: serve as shipped under h2load beside a canned-response ceiling; BENCH_ARGS=--quick for a smoke run
	$(BIN)/python -m tests.benchmarks.bench --json .bench.json $(BENCH_ARGS)

clean:  ## remove the virtualenv and caches
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
