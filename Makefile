# The README's two commands: `make demo` and `make test`. Both start with the same idempotent
# setup (scripts/setup.sh: .venv, apt packages for ffcv, torch, the project with all extras).
PY := .venv/bin/python
TOY := data/toy_imagenet
DEMO_CONFIG := configs/simsiam_resnet18_toy-demo.yaml
DEMO_DIR := work_dirs/toy_demo

.PHONY: setup demo test lint clean-demo

setup:
	@bash scripts/setup.sh

$(TOY)/train:
	$(PY) data_prep/make_toy_imagenet.py --out $(TOY)

# The demo's crops are 32-64 px: 160 px raw pixels decode for free and keep every crop sharp.
$(TOY)/train.beton: | $(TOY)/train
	$(PY) data_prep/to_ffcv.py --src $(TOY)/train --out $@ --max-resolution 160 --write-mode raw

$(TOY)/val.beton: | $(TOY)/train.beton
	$(PY) data_prep/to_ffcv.py --src $(TOY)/val --classes $(TOY)/train.classes.json --out $@ \
		--max-resolution 160 --write-mode raw

# Generate the toy ImageNet, convert it to FFCV, then train SimSiam on it from scratch (a fresh
# run each time) and print loss, the collapse monitor, images/s and kNN top-1 against random init.
demo: setup $(TOY)/val.beton
	rm -rf $(DEMO_DIR)
	$(PY) -m fastsiam train --config $(DEMO_CONFIG) --work-dir $(DEMO_DIR)
	$(PY) -m fastsiam plot $(DEMO_DIR)

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest -q

lint: setup
	$(PY) -m ruff check .
	$(PY) -m mypy

clean-demo:
	rm -rf $(DEMO_DIR) $(TOY)
