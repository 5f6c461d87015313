# Every target sets up what it needs on a fresh machine: the venv, the packages, the dataset package.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup data demo study teacher bench-quick test compat docs lint format bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

# Fashion-MNIST's idx files from Debian's package, for the built-in fashion-mnist-clutter dataset.
data:
	@dpkg -s dataset-fashion-mnist >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist; }

# The main job on the built-in data: fine-tune DynamicViT and A-ViT from the shipped dense model, compare,
# write report/ (re-runs reuse finished steps).
demo: setup data
	$(VENV)/bin/tokensparse demo

# The full study committed in benchmarks/results/study: the authors' relative budgets, three seeds of the
# headline rows, A-ViT's loss-weight grid. About 10 hours of training on 2 CPU cores (about 10 minutes on a
# GPU with scripts/train_study_parallel.py, README); every fine-tune resumes where a killed run stopped.
study: setup data
	$(VENV)/bin/tokensparse demo --study

# The shipped dense model, in three stages (resumable: re-run after an interruption), then shipped into the
# package: 12 epochs at peak lr 2e-3, 10 more from those weights at peak lr 1e-3, then 12 more at peak lr 5e-4
# (cosine, 1 warm-up epoch each); 4-6 min per epoch on 2 CPU cores (about 3 hours in all).
TEACHER_ARGS = --method dense --model vit_tiny_patch16_224 \
	--model-kwargs '{"patch_size": 8, "embed_dim": 64, "depth": 12, "num_heads": 2}' \
	--batch-size 128 --warmup-epochs 1 --smoothing 0.1 --resume
teacher: setup data
	$(VENV)/bin/tokensparse train $(TEACHER_ARGS) --epochs 12 --lr 2e-3 --output runs/teacher-stage1
	$(VENV)/bin/tokensparse train $(TEACHER_ARGS) --epochs 10 --lr 1e-3 --output runs/teacher \
	  --checkpoint runs/teacher-stage1/model.safetensors
	$(VENV)/bin/tokensparse train $(TEACHER_ARGS) --epochs 12 --lr 5e-4 --output runs/teacher-stage3 \
	  --checkpoint runs/teacher/model.safetensors
	$(PY) scripts/ship_pretrained.py runs/teacher-stage3 clutter-vit --command "make teacher" \
	  --previous runs/teacher-stage1 runs/teacher

# A short speed table: executed GFLOPs, img/s and speedup of DynamicViT on DeiT-S (random weights).
bench-quick: setup
	$(VENV)/bin/tokensparse bench

test: setup data
	$(PY) -m pytest tests

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

format: setup
	$(VENV)/bin/ruff format src tests benchmarks
	$(VENV)/bin/ruff check --fix src tests benchmarks

bench: setup
	$(PY) benchmarks/bench_dynamicvit.py
	$(PY) benchmarks/bench_avit.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache .ruff_cache

# The core tests (golden outputs of the authors' code, training, budgets) against the lowest timm the package
# declares (pyproject.toml), installed beside the newest in .venv/compat-timm (about 1.5 min).
COMPAT_TIMM = 1.0.16
compat: setup data
	test -d $(VENV)/compat-timm/timm-$(COMPAT_TIMM).dist-info || \
	  $(PY) -m pip install -q --no-deps --target $(VENV)/compat-timm "timm==$(COMPAT_TIMM)"
	PYTHONPATH=$(VENV)/compat-timm $(PY) -c "import timm; assert timm.__version__ == '$(COMPAT_TIMM)', timm.__version__"
	PYTHONPATH=$(VENV)/compat-timm $(PY) -m pytest -q -p no:cacheprovider tests/test_avit.py tests/test_avit_grads.py \
	  tests/test_baselines.py tests/test_checkpoints.py tests/test_dynamicvit.py tests/test_dynconv.py \
	  tests/test_losses.py tests/test_train.py tests/test_budget.py

# The API reference from the docstrings, opening with the README's guides, into build/docs (pdoc; a warning
# is an error).
DOC_MODULES = tokensparse tokensparse.budget tokensparse.runs tokensparse.engine tokensparse.flops \
	tokensparse.export tokensparse.bench tokensparse.evaluate tokensparse.data tokensparse.clutter tokensparse.losses \
	tokensparse.checkpoints tokensparse.training tokensparse.viz tokensparse.policies.dynamicvit \
	tokensparse.policies.avit tokensparse.policies.tome tokensparse.policies.evit tokensparse.policies.baselines \
	tokensparse.policies.dynconvnext tokensparse.policies.dynswin tokensparse.policies.registry \
	tokensparse.policies.diffrate tokensparse.policies.diffrate_search tokensparse.policies.diffrate_published \
	tokensparse.policies.dynspatial tokensparse.adapters
docs: setup
	rm -rf build/docs
	$(PY) -W error -m pdoc $(DOC_MODULES) -o build/docs
	test -s build/docs/tokensparse.html
