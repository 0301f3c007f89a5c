# Two commands for a newcomer: `make run` (set up + train the embedded model) and `make test`.
# Every install goes through constraints.txt, which pins torch to the CPU build on disk.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# hpsv2's own scoring code, for the HPS equality test only: kept in its own folder because its pins
# break ray[default] and a torchvision on the path would be picked up by transformers.
HPS_REF := $(VENV)/hpsv2-reference

.PHONY: install run test test-fast clean

# uv resolves and installs in parallel: the whole install took about a minute on a clean clone where
# pip took 6. It reads no pip.conf, so the torch wheel on this disk is named with --find-links.
# --compile-bytecode: uv writes no .pyc by itself, and where PYTHONDONTWRITEBYTECODE is set (this
# machine, CI) every process would compile torch, diffusers and Ray from source at each import:
# importing torch, diffusers, peft and ray.train.torch took 15.5 s that way and 6.8 s from .pyc.
UV := $(PY) -m uv pip install --python $(PY) --quiet --compile-bytecode -c constraints.txt $(if $(wildcard /opt/wheels),--find-links /opt/wheels)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt uv
	$(UV) torch==2.13.0
	$(UV) -e '.[test]'
	rm -rf $(HPS_REF)
	$(UV) --no-deps --target $(HPS_REF) hpsv2==1.2.0 torchvision==0.28.0 ftfy==6.3.1 wcwidth==0.9.4 clint==0.5.1 args==0.1.0
	$(PY) -m pip download -q --no-deps -d $(HPS_REF)/wheels -c constraints.txt open_clip_torch==3.3.0
	$(PY) tests/rewards/reference/install_hpsv2_vocab.py $(HPS_REF) $(HPS_REF)/wheels/open_clip_torch-3.3.0-py3-none-any.whl
	touch $(STAMP)

install: $(STAMP)

run: install
	$(PY) -m dense_rl.launch $(ARGS)

test: install
	$(PY) -m pytest -q --durations=25 $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
