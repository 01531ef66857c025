# The two commands a user needs: `make demo` and `make test`. Each creates or reuses .venv and
# installs what it needs; only a Python 3.10+ interpreter has to exist beforehand.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.d3n-installed
DEMO_OUT ?= runs/demo

.PHONY: install demo test test-openvino lint clean

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
	$(MAKE) test-openvino

# OpenVINO (`d3n run --device openvino`, `d3n bench`'s OpenVINO and NNCF rows) is tested in a venv of
# its own that sees .venv's packages: openvino loaded in the same process as torch training
# segfaults a later training step, so its tests run in a process where no training runs.
OVENV ?= .venv-openvino
OV_STAMP := $(OVENV)/.d3n-installed
$(OV_STAMP): $(STAMP)
	@test -x $(OVENV)/bin/python || $(PY) -m venv $(OVENV)
	$(OVENV)/bin/python -c 'import sys, sysconfig, pathlib; pathlib.Path(sysconfig.get_paths()["purelib"], "d3n-main-venv.pth").write_text(f"import site; site.addsitedir({sys.argv[1]!r})\n")' \
	  "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
	$(OVENV)/bin/python -m pip install --quiet 'openvino>=2024.0' 'nncf>=2.14'
	$(OVENV)/bin/python -c "import openvino, torch, d3n; print('openvino', openvino.__version__)"
	@touch $(OV_STAMP)

test-openvino: $(OV_STAMP)
	$(OVENV)/bin/python -m pytest -q -p no:cacheprovider tests/runtime/test_runtime_openvino.py tests/runtime/test_runtime_backends.py
	$(OVENV)/bin/python -m pytest -q -p no:cacheprovider tests/export/test_export_bench.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) $(OVENV) runs build *.egg-info
