# The two commands: `make test` and `make demo`. Both create .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_DIR ?= demo_out

.PHONY: test test-slow demo install browser clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[test]'
	touch $@

install: $(BIN)/.installed

# The page's test (tests/test_page.py) drives Debian's chromium through its chromedriver: installed
# here when missing, as root (CI); otherwise that test fails and names the packages.
browser:
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; \
	  else \
	    echo "make: tests/test_page.py needs chromium and chromedriver: sudo apt-get install chromium chromium-driver" >&2; \
	  fi; \
	fi

test: install browser
	$(BIN)/python -m pytest -q

# The tests marked slow, which `make test` leaves out: the multi-node tests (a 3-node Ray cluster on
# this machine loses a worker node in each stage; they start their own Ray, so they run first, before
# any other test starts one), the cluster end-to-end test and the GPU check's CPU run.
test-slow: install
	$(BIN)/python -m pytest -q -m slow

demo: install
	$(BIN)/python jobs/demo.py --out $(DEMO_DIR)

clean:
	rm -rf $(VENV) $(DEMO_DIR)
