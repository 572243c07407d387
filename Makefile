# Two commands for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
NATIVE := pyconv_jax/native/libpyconv_onednn.so pyconv_jax/native/libpyconv_block_cache.so

.PHONY: venv demo test table benchmark clean

venv: $(STAMP) $(NATIVE)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[test,onednn]"
	touch $(STAMP)

# oneDNN convolutions for XLA:CPU (the `onednn` lowering) and the block cache the scripts preload
# (pyconv_jax/host.py). Where one cannot be built (not Linux x86-64, no compiler) the build says
# why and `make` goes on: CPU convs use the `split` lowering, the scripts run without the cache.
$(NATIVE) &: $(STAMP) $(wildcard pyconv_jax/native/*.cc pyconv_jax/native/*.h pyconv_jax/native/*.c)
	$(PY) -m pyconv_jax.native.build || echo "continuing without some native code (see above)"

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
