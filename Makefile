# Two commands for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
NATIVE := pyconv_jax/native/libpyconv_onednn.so

.PHONY: venv demo test table benchmark clean

venv: $(STAMP) $(NATIVE)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[test,onednn]"
	touch $(STAMP)

# oneDNN convolutions for XLA:CPU (the `onednn` lowering). Where they cannot be built (not Linux
# x86-64, no C++ compiler) the build says why and CPU convs use the `split` lowering instead.
$(NATIVE): $(STAMP) pyconv_jax/native/onednn_conv.cc
	$(PY) -m pyconv_jax.native.build || echo "continuing without the onednn lowering"

demo: venv
	$(PY) scripts/train.py --config configs/digits.py --workdir runs/digits

test: venv
	$(PY) -m pytest -q tests

table: venv
	$(PY) scripts/model_table.py

benchmark: venv
	$(PY) scripts/benchmark.py

clean:
	rm -rf $(VENV) runs .pytest_cache $(NATIVE)
