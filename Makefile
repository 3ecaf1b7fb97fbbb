# `make demo` and `make test` each create .venv when missing; a second run installs nothing.
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
export NO_ALBUMENTATIONS_UPDATE := 1
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: demo test test-all bench clean

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	# PyPI's CPU-only torch 2.13 breaks torchvision here: install the matching pair first.
	$(VENV)/bin/pip install -q torch==2.14.1 torchvision==0.29.1
	# the packaging test builds the wheel without build isolation: it needs a current setuptools here
	$(VENV)/bin/pip install -q 'setuptools>=70.1'
	$(VENV)/bin/pip install -q -e '.[dev]'
	# WordNet 3.0 for `recap metadata build --wordnet` (Debian's wordnet-base): best effort, as root only
	@if [ ! -e /usr/share/wordnet/data.noun ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  timeout 300 sh -c 'apt-get install -y -q wordnet-base >/dev/null 2>&1 || \
	    (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q wordnet-base >/dev/null 2>&1)' \
	  || echo "note: wordnet-base not installed; WordNet metadata tests will be skipped"; fi
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/recap demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

test-all: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m ''

clean:
	rm -rf demo-out
