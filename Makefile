# Two commands do all the set-up on a fresh clone (Linux or macOS):
#   make demo   creates .venv, installs mobileo-mlx, runs the offline demo end to end
#   make test   installs the test extras into the same .venv and runs the whole suite
# Both install the exact versions in constraints.txt (what the suite was last verified
# with), so an upstream release cannot break them overnight; `make test-latest` runs the
# suite against the newest releases instead, in .venv-latest.
PYTHON      ?= python3
VENV        ?= .venv
BIN         := $(VENV)/bin
OUT         ?= out
CONSTRAINTS := constraints.txt
LATEST      ?= .venv-latest
NATIVE      := $(wildcard kernels/native/*.c kernels/native/*.cpp kernels/native/*.h)

.PHONY: install install-test demo test test-latest wheel-check doctor clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# --build-constraint: the mlx whose C++ headers build the graph nodes (setup.py) is the pinned one
# that runs them (its C++ ABI changes between releases).
$(VENV)/.installed: $(BIN)/python pyproject.toml setup.py $(CONSTRAINTS) $(NATIVE)
	$(BIN)/python -m pip install --quiet -c $(CONSTRAINTS) --build-constraint $(CONSTRAINTS) -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -c $(CONSTRAINTS) --build-constraint $(CONSTRAINTS) -e ".[test]"
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

doctor: install
	$(BIN)/mobileo-mlx doctor

demo: install
	$(BIN)/mobileo-mlx doctor
	mkdir -p $(OUT)
	$(BIN)/mobileo-mlx generate --model demo "a red bicycle leaning on a wall" --seed 0 -o $(OUT)/demo.png --force
	$(BIN)/mobileo-mlx ask --model demo $(OUT)/demo.png "What is in this picture?" --max-tokens 24

test: install-test
	$(BIN)/python -m pytest -q

# The suite against the newest release of every dependency (no constraints), in its own venv.
test-latest:
	test -x $(LATEST)/bin/python || $(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install --quiet --upgrade pip
	$(LATEST)/bin/python -m pip install --quiet --upgrade --upgrade-strategy eager -e ".[test]"
	$(LATEST)/bin/python -m pip list --format=freeze | grep -iE '^(mlx|mlx-lm|transformers|diffusers|huggingface.hub|tokenizers|kernels|numpy|torch)=' || true
	$(LATEST)/bin/python -m pytest -q

# Build the wheel, install it (not editable) beside the newest transformers in a fresh venv,
# and use it from outside the checkout (what CI runs after `make test`).
wheel-check: install
	$(BIN)/python .ci/wheel_check.py

clean:
	rm -rf $(VENV) $(LATEST) build *.egg-info $(OUT) kernels/native/*.so
