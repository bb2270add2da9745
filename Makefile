# krasis: the two set-up commands are `make demo` and `make test`.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
STAMP := build/.installed

.PHONY: install demo test lint bench-cpu clean

# torch==2.13.0 first: on these machines that pin takes a local CPU build.
$(STAMP): pyproject.toml setup.py $(wildcard native/src/*.cpp native/src/*.h)
	$(PIP) install -q torch==2.13.0 || $(PIP) install -q torch
	$(PIP) install -q -e '.[test]'
	@mkdir -p build && touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	bash scripts/demo.sh

test: $(STAMP)
	$(PYTHON) -m ruff check .
	$(PYTHON) -m pytest -q tests

clean:
	rm -rf build *.egg-info krasis_native*.so
