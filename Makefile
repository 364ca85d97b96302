# Two commands: `make demo` (the whole lifecycle on embedded defaults) and `make test`.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := 1
PYTEST_ARGS ?=
# The 30 s, 16-client load test of the API runs in `make test` (tests/test_api_live.py).
export CXR_LONG_TESTS ?= 1

.PHONY: demo test venv system-deps clean compile-pipeline

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

venv: $(STAMP)

# Debian packages the tests use (Prometheus + promtool, docker-compose v1 to parse the compose file,
# poppler-utils for reading PDFs back, Orthanc as the test PACS, dcmtk as the modality and SR reader,
# dicom3tools' dciodvfy as the IOD validator). Installed only when missing; needs root (CI runs as root).
system-deps:
	@missing=""; \
	command -v promtool >/dev/null || missing="$$missing prometheus"; \
	command -v docker-compose >/dev/null || missing="$$missing docker-compose"; \
	command -v pdftotext >/dev/null || missing="$$missing poppler-utils"; \
	command -v Orthanc >/dev/null || test -x /usr/sbin/Orthanc || missing="$$missing orthanc"; \
	command -v storescu >/dev/null || missing="$$missing dcmtk"; \
	command -v dciodvfy >/dev/null || missing="$$missing dicom3tools"; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  (apt-get update -qq || true) && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

demo: venv
	$(BIN)/cxr demo

test: venv system-deps
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf .cxr .pytest_cache
