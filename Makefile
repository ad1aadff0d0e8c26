# One entry point for setting up and running effdet_jax. pip is the only installer.
#   make demo   set up, then train + evaluate the built-in synthetic "shapes" config
#   make test   set up (including the PyTorch reference arrays), then run the whole test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The PyTorch side (timm / effdet) lives in its own Python 3.11 environment outside the clone.
TORCH_PYTHON ?= python3.11
TORCH_VENV ?= $(HOME)/.cache/effdet_jax/torch-venv
REFS ?= $(HOME)/.cache/effdet_jax/torch_refs
# onnx2tf (LiteRT / SavedModel export) pins other numpy / onnx / protobuf versions: its own venv.
ONNX2TF_VENV ?= $(HOME)/.cache/effdet_jax/onnx2tf-venv
WORKDIR ?= /tmp/effdet_jax_shapes
REF_SCRIPTS := $(wildcard tools/torch_reference/make_*.py)
REF_FILES := $(patsubst tools/torch_reference/make_%.py,$(REFS)/%.npz,$(REF_SCRIPTS))

.PHONY: setup demo test test-all refs lint onnx2tf

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]' onnx onnx-ir onnxruntime
	$(PY) -m pip install -q --no-deps 'jax2onnx>=0.17.1'  # the export extra without its orbax pin
	touch $@

setup: $(VENV)/.installed

$(TORCH_VENV)/.installed: tools/torch_reference/requirements.txt
	$(TORCH_PYTHON) -m venv $(TORCH_VENV)
	$(TORCH_VENV)/bin/pip install -q -r tools/torch_reference/requirements.txt
	touch $@

$(REFS)/%.npz: tools/torch_reference/make_%.py tools/torch_reference/common.py $(TORCH_VENV)/.installed
	@mkdir -p $(REFS)
	$(TORCH_VENV)/bin/python $< --out $@

refs: $(REF_FILES)

# --config.export.formats=savedmodel,tflite runs $(ONNX2TF_VENV)/bin/onnx2tf (EFFDET_JAX_ONNX2TF_VENV
# points elsewhere).
$(ONNX2TF_VENV)/.installed: tools/onnx2tf/requirements.txt
	$(PYTHON) -m venv $(ONNX2TF_VENV)
	$(ONNX2TF_VENV)/bin/pip install -q -r tools/onnx2tf/requirements.txt
	touch $@

onnx2tf: $(ONNX2TF_VENV)/.installed

# main.py sets up its own malloc: it re-executes itself with tcmalloc (or jemalloc) preloaded where
# one is installed, else with glibc's huge pages (effdet_jax/train/launcher.py;
# EFFDET_JAX_CPU_MALLOC=0 keeps the environment as given).
demo: setup
	$(PY) main.py --config=configs/shapes.py --workdir=$(WORKDIR)

lint: setup
	$(VENV)/bin/ruff check .

# --dist loadscope keeps each test module on one worker: its module-scoped fixtures (compiled tiny
# runs) are built once per suite, not once per worker.
test: setup refs
	$(VENV)/bin/ruff check .
	EFFDET_JAX_REFS=$(REFS) EFFDET_JAX_REQUIRE_REFS=1 EFFDET_JAX_REQUIRE_CPU_KERNEL=1 $(PY) -m pytest -n 2 --dist loadscope -q --durations=25 tests

# The slow tests include the SavedModel / LiteRT export, which needs the onnx2tf venv.
test-all: setup refs onnx2tf
	EFFDET_JAX_REFS=$(REFS) EFFDET_JAX_REQUIRE_REFS=1 EFFDET_JAX_REQUIRE_CPU_KERNEL=1 \
	  EFFDET_JAX_ONNX2TF_VENV=$(ONNX2TF_VENV) EFFDET_JAX_REQUIRE_ONNX2TF=1 $(PY) -m pytest -n 2 --dist loadscope -q -m "" tests
