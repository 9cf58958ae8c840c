# Two commands do all the set-up on a fresh clone (Linux or macOS):
#   make demo   creates .venv, installs mobileo-mlx, runs the offline demo end to end
#   make test   installs the test extras into the same .venv and runs the whole suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
OUT    ?= out

.PHONY: install install-test demo test doctor clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml setup.py mobileo_mlx/_native/blas_shim.c $(wildcard kernels/native/*.c kernels/native/*.h)
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e ".[test]"
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

clean:
	rm -rf $(VENV) build *.egg-info $(OUT) mobileo_mlx/_native/*.so
