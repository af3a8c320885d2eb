# One command each (see README):  make demo   |   make test
# Creates .venv, installs pinned dependencies (torch first: an unpinned torch pulls a
# multi-GB CUDA build), builds the C++ plugin against that torch/openmm, then runs.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.requirements-installed

.PHONY: setup build test test-cpp demo benchmark pretrained electrolyte-data pretrained-electrolyte clean

setup: $(STAMP)

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -r requirements.txt torch==2.13.0
	touch $(STAMP)

build: setup
	$(PIP) install --quiet --no-build-isolation --no-deps -e .

test: build
	$(PY) -m pytest -q

test-cpp: build
	build/cmake/tests/TestCGMLIntegrator

demo: build
	$(VENV)/bin/cgml demo

benchmark: build
	$(PY) benchmarks/integrator_overhead.py

# The shipped pretrained chain model (openmm_cgml/pretrained/chain; see its MODEL_CARD.md):
# MD of 16 class-I chains on both cores (~30 min), two training seeds in parallel (~25 min),
# export of the seed with the better validation-rollout score, and the accuracy benchmark
# on the held-out class-II chains (~15 min). Resumable: MD and training continue where
# they stopped.
CGML := $(VENV)/bin/cgml
PRETRAIN_DATA := data/chain-pretrain
PRETRAIN_MD := chain --preset full --seed 0 --n-train 16 --n-test 0 --n-frames 2400 \
	--set n_monomers=[30,50,70,100] --set equilibration_tau=1500 --out $(PRETRAIN_DATA) --threads 1 --no-progress
pretrained: build
	set -e; \
	$(CGML) generate $(PRETRAIN_MD) --only chain_train_000 chain_train_003 chain_train_004 chain_train_007 \
		chain_train_008 chain_train_011 chain_train_012 chain_train_015 & a=$$!; \
	$(CGML) generate $(PRETRAIN_MD) --only chain_train_001 chain_train_002 chain_train_005 chain_train_006 \
		chain_train_009 chain_train_010 chain_train_013 chain_train_014 & b=$$!; \
	wait $$a; wait $$b
	$(CGML) generate $(PRETRAIN_MD)
	set -e; for seed in 0 1; do \
		OMP_NUM_THREADS=1 $(CGML) train chain-pretrained --data-dir $(PRETRAIN_DATA) --out runs/chain-pretrained-s$$seed \
			--set seed=$$seed --no-progress $$( [ -f runs/chain-pretrained-s$$seed/checkpoints/last.pt ] && echo --resume ) & \
		eval "pid$$seed=$$!"; done; wait $$pid0; wait $$pid1
	$(PY) benchmarks/pick_seed.py runs/chain-pretrained-s0 runs/chain-pretrained-s1 > runs/chain-pretrained-choice.txt
	rm -rf openmm_cgml/pretrained/chain.new
	$(CGML) export $$(head -1 runs/chain-pretrained-choice.txt) -o openmm_cgml/pretrained/chain.new
	cp openmm_cgml/pretrained/chain/MODEL_CARD.md openmm_cgml/pretrained/chain.new/ 2>/dev/null || true
	rm -rf openmm_cgml/pretrained/chain && mv openmm_cgml/pretrained/chain.new openmm_cgml/pretrained/chain
	$(PY) benchmarks/accuracy.py --model openmm_cgml/pretrained/chain --steps 5000 --seeds 3 \
		--train-tau 1500 12000 --sl-data $(PRETRAIN_DATA) --json runs/chain-pretrained-accuracy.json \
		| tee runs/chain-pretrained-accuracy.md

# The electrolyte training data (issue 13): two training compositions and the held-out
# one, ~900 atoms each, 1 ns each at 2 ps per frame after 82 ps of equilibration, all
# three in parallel on 2 cores (~2 h; measured: 100 ps of production per ~20 min per
# process with three processes sharing the cores). Resumable.
EL_DATA := data/electrolyte-pretrain
EL_MD := electrolyte --preset demo --seed 0 --set target_atoms=900 --set n_frames_train=500 \
	--set n_frames_test=500 --out $(EL_DATA) --threads 1 --no-progress
electrolyte-data: build
	set -e; \
	$(CGML) generate $(EL_MD) --only electrolyte_train_000_eo8_li9 & a=$$!; \
	$(CGML) generate $(EL_MD) --only electrolyte_train_001_eo16_li6 & b=$$!; \
	$(CGML) generate $(EL_MD) --only electrolyte_test_000_eo12_li6 & c=$$!; \
	wait $$a; wait $$b; wait $$c
	$(CGML) generate $(EL_MD)

# gns (12,000 steps) and et (3,000: 4x slower per step) trained side by side on the
# same data (one core each, ~35-45 min),
# both exported and evaluated on the held-out composition with `cgml evaluate` (refined,
# unrefined, short MD; ~25 min), the refinement settings scanned over seeds on the gns
# model (benchmarks/refinement_scan.py), and the gns model copied to
# openmm_cgml/pretrained/electrolyte; runs/electrolyte-pretrained-* hold the rest.
pretrained-electrolyte: electrolyte-data
	set -e; for backbone in gns et; do \
		OMP_NUM_THREADS=1 $(CGML) train electrolyte-pretrained --out runs/electrolyte-pretrained-$$backbone/train \
			--set model.backbone=$$backbone --no-progress $$( [ $$backbone = et ] && echo --steps 3000 ) \
			$$( [ -f runs/electrolyte-pretrained-$$backbone/train/checkpoints/last.pt ] && echo --resume ) & \
		eval "pid_$$backbone=$$!"; done; wait $$pid_gns; wait $$pid_et
	set -e; for backbone in gns et; do \
		$(CGML) export runs/electrolyte-pretrained-$$backbone/train -o runs/electrolyte-pretrained-$$backbone/model; done
	$(CGML) evaluate --model gns=runs/electrolyte-pretrained-gns/model --model et=runs/electrolyte-pretrained-et/model \
		--data $(EL_DATA) --out runs/electrolyte-pretrained-report --no-progress
	$(PY) benchmarks/refinement_scan.py runs/electrolyte-pretrained-gns/model --data $(EL_DATA) \
		--settings none 1:constant:5e-5 2:constant:5e-5 1:constant:2e-4 2:constant:2e-4 \
		| tee runs/electrolyte-pretrained-refinement.md
	$(PY) benchmarks/one_step_structure.py runs/electrolyte-pretrained-gns/model --data $(EL_DATA) \
		| tee runs/electrolyte-pretrained-one-step.md
	# gns ships, with eps 2e-4 chosen by the scan (MODEL_CARD.md: the comparison and the scan)
	rm -rf openmm_cgml/pretrained/electrolyte.new
	$(CGML) export runs/electrolyte-pretrained-gns/train --langevin-step-size 2e-4 -o openmm_cgml/pretrained/electrolyte.new
	cp openmm_cgml/pretrained/electrolyte/MODEL_CARD.md openmm_cgml/pretrained/electrolyte.new/ 2>/dev/null || true
	rm -rf openmm_cgml/pretrained/electrolyte && mv openmm_cgml/pretrained/electrolyte.new openmm_cgml/pretrained/electrolyte

clean:
	rm -rf build openmm_cgml/*.so *.egg-info
