# Two commands: `make run` and `make test`. Both bootstrap .venv with pinned dependencies.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint typecheck unit bench clean system-deps

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

# The C byte scanner for DATA (relay/wire.py runs the same in Python without it): built
# with the system's C compiler against the venv's Python headers; no compiler, a notice.
WIRESCAN := relay/_wirescan.so
$(WIRESCAN): relay/_wirescan.c $(STAMP)
	@inc=$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["include"])'); \
	if command -v $(CC) >/dev/null 2>&1 && test -f "$$inc/Python.h"; then \
	  $(CC) -O3 -Wall -shared -fPIC -I"$$inc" relay/_wirescan.c -o $@; \
	else echo "note: no C compiler or Python.h: DATA is scanned in Python (slower)"; fi

run: $(STAMP) $(WIRESCAN)
	$(BIN)/relay --config config.toml serve

# Debian packages the tests use: swaks (a client), postgresql (the cluster queue's
# engine; the tests start a private throwaway cluster), chromium and chromium-driver (the
# status page's browser tests, driven by Selenium). Installed only when missing.
system-deps:
	@missing=""; \
	command -v swaks >/dev/null 2>&1 || missing="$$missing swaks"; \
	ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || missing="$$missing postgresql"; \
	test -x /usr/bin/chromium || missing="$$missing chromium"; \
	test -x /usr/bin/chromedriver || missing="$$missing chromium-driver"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else echo "missing:$$missing: run 'sudo apt-get install$$missing'"; exit 1; fi; \
	fi

# AWS's own S3 encryption client, the independent writer of the objects the inbound
# decryptor is tested against. Its only release (4.0.0) pins cryptography<49 while the relay
# pins 50.x, which pip's resolver refuses; without its dependencies it works with 50.x.
AWS_S3EC := $(VENV)/.aws-s3ec
$(AWS_S3EC): $(STAMP)
	$(BIN)/pip install --quiet --no-deps amazon-s3-encryption-client-python==4.0.0
	touch $@

lint: $(STAMP)
	$(BIN)/ruff check relay tests bench hatch_build.py
	$(BIN)/ruff format --check relay tests bench hatch_build.py

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP) $(WIRESCAN) $(AWS_S3EC) system-deps
	$(BIN)/python -m pytest

test: lint typecheck unit

bench: $(STAMP) $(WIRESCAN) system-deps
	$(BIN)/python -m bench.failover
	$(BIN)/python -m bench.perf
	$(BIN)/python -m bench.queue
	$(BIN)/python -m bench.memory
	$(BIN)/python -m bench.search
	$(BIN)/python -m bench.operator
	$(BIN)/python -m bench.events
	$(BIN)/python -m bench.routing

clean:
	rm -rf $(VENV) var .mypy_cache .ruff_cache .pytest_cache
