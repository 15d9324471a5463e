# Two commands for a new user: `make demo` and `make test`. Both install into ./.venv first if needed.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# Reinstall only when the declared dependencies change (install is idempotent and cheap when nothing did).
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: install demo test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	@rm -f $(VENV)/.installed-* && touch $@

demo: install
	$(BIN)/transfer-flow demo --output demo-output

test: install
	$(BIN)/python -m pytest

clean:
	rm -rf demo-output .pytest_cache
