# The two commands a user needs: `make demo` and `make test`. Each creates or reuses .venv and
# installs what it needs; only a Python 3.10+ interpreter has to exist beforehand.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.d3n-installed
DEMO_OUT ?= runs/demo

.PHONY: install demo test lint clean

install: $(STAMP)

# torch/torchvision come from the `train` extra as an exact matched pair (see pyproject.toml); the
# import check below fails the install loudly if a mismatched torch slipped in.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[train,export,dev]'
	$(PY) -c "import torch, torchvision, torchvision.ops; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/d3n demo --out $(DEMO_OUT)

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) runs build *.egg-info
