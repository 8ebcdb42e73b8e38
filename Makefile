# The two commands: `make test` and `make demo`. Both create .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_DIR ?= demo_out

.PHONY: test demo install clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[test]'
	touch $@

install: $(BIN)/.installed

test: install
	$(BIN)/python -m pytest -q

demo: install
	$(BIN)/python jobs/demo.py --out $(DEMO_DIR)

clean:
	rm -rf $(VENV) $(DEMO_DIR)
