# sslrun: `make train` and `make test` each set up everything they need on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
ARGS   ?=

.PHONY: install data slurm peers train test test-fast bench benchmark report docker clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	rm -f $(VENV)/.installed-* && touch $(STAMP)

install: $(STAMP)

# Debian's dataset-fashion-mnist: the embedded default data set (installed when we are root).
data:
	@scripts/install_data.sh

# The default run: SimCLR on Fashion-MNIST, under 5 minutes on 2 CPU cores. Extra overrides: ARGS="..."
train: install data
	$(BIN)/python -m sslrun $(ARGS)

# A single-node SLURM cluster for the SLURM tests (Debian's slurm-wlm and munge, installed when we are root).
slurm:
	@scripts/slurm_cluster.sh install

test: install data slurm peers
	$(BIN)/python -m pytest -q $(ARGS)

# Unit tests only (no end-to-end training runs).
test-fast: install data peers
	$(BIN)/python -m pytest -q -m "not slow" $(ARGS)

# lightly, for scripts/bench_peers.py only (sslrun never imports it); --no-deps: its pins must not replace torch.
peers: install
	@$(BIN)/python -c "import importlib.metadata as m; assert m.version('lightly') == '1.6.0'" 2>/dev/null || \
		$(BIN)/python -m pip install --quiet --no-deps 'lightly==1.6.0'

# The side-by-side with lightly resumes where it stopped; its first full run (8 methods x 3 seeds x
# 2 sides, each quick recipe and a kNN evaluation) takes about 2 hours on 2 cores. PEERS_ARGS="--methods simclr".
PEERS_ARGS ?=
bench: install data peers
	$(BIN)/python scripts/bench.py $(ARGS)
	$(BIN)/python scripts/bench_multicrop.py
	$(BIN)/python scripts/bench_memory.py
	$(BIN)/python scripts/bench_ijepa.py
	$(BIN)/python scripts/bench_loader.py
	$(BIN)/python scripts/bench_compile.py
	$(BIN)/python scripts/bench_peers.py $(PEERS_ARGS)

# Every registered method at a suite's budget, offline kNN and linear, 3 seeds -> docs/results.md
# (python -m sslrun.benchmark; resumes where it stopped). ARGS="suite=long methods=[simclr,byol]".
benchmark: install data
	$(BIN)/python -m sslrun.benchmark $(ARGS)

# Compare finished runs (a sweep directory or run directories): report.md, loss.png, knn.png.
RUNS ?=
report: install
	$(BIN)/python -m sslrun.report $(RUNS)

# The CUDA image (docker/Dockerfile); needs Docker, which sslrun's CI machine does not have.
docker:
	docker build -f docker/Dockerfile -t sslrun:$(shell $(PYTHON) -c "import tomllib; print(tomllib.load(open('pyproject.toml','rb'))['project']['version'])") -t sslrun:latest .

clean:
	rm -rf $(VENV) outputs multirun *.egg-info
