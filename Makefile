# make demo: set up, make the synthetic data set (unless input/ holds data), split folds, train fold 0
#            with the CPU demo schedule, predict the test set with TTA, score it (synthetic truth only)
#            (run again, it keeps what is done: training resumes, a finished run is not trained again)
# make bench-gpu: every benchmark's GPU variant, tables to bench/results/gpu.md (sized for 9 min on one H100)
# make parts: the multi-class example: synthetic car parts in input-parts/, folds, train fold 0
#             (configs/cpu_parts.toml), a PNG mask per test image, scored per class against the truth
# make multilabel: the overlapping-classes example (issue 28): synthetic studio cars labelled car, glass and shadow
#                  as per-class RLE rows (input-multilabel/train.csv), 2 folds by car, both trained
#                  (configs/cpu_multilabel.toml), post-processing tuned out of fold, the submission in
#                  sample_submission.csv's rows, scored against the test truth (test_masks.csv)
# make slides: the larger-than-memory example (issue 29): synthetic HuBMAP-like tiled TIFF slides in input-slides/
#              (train.csv: column-major RLE rows), a fold per slide, fold 0 trained on 256 x 256 tiles
#              (configs/cpu_slides.toml), the test slide predicted by the sliding window into sample_submission.csv's
#              id,predicted rows, scored against the test truth (test_masks.csv)
# make test: set up (with Ray for the cluster tests, TensorBoard for --tensorboard's, tifffile for the slides',
#            the serve extra and chromium for the serve tests) and run the tests (this is what CI runs);
#            make test-fast: the fast tier, under a minute
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_RUN := runs/demo

.PHONY: setup setup-cluster setup-tensorboard setup-slides setup-serve setup-browser demo data folds train infer parts multilabel slides test test-fast bench bench-gpu

setup: $(VENV)/.installed

setup-cluster: $(VENV)/.installed-cluster

setup-tensorboard: $(VENV)/.installed-tensorboard

$(VENV)/.installed-tensorboard: requirements-tensorboard.txt $(VENV)/.installed
	$(BIN)/pip install -q -r requirements-tensorboard.txt
	touch $@

# The slides extra (competition.slides, synthetic --slides, bench/slides_bench.py): tifffile and its codecs
setup-slides: $(VENV)/.installed-slides

$(VENV)/.installed-slides: requirements-slides.txt $(VENV)/.installed
	$(BIN)/pip install -q -r requirements-slides.txt
	touch $@

$(VENV)/.installed-cluster: requirements-cluster.txt $(VENV)/.installed
	$(BIN)/pip install -q -r requirements-cluster.txt
	touch $@

# The serve extra (python -m competition.serve and its tests): FastAPI, uvicorn, and Playwright for the page's test
setup-serve: $(VENV)/.installed-serve

$(VENV)/.installed-serve: requirements-serve.txt $(VENV)/.installed
	$(BIN)/pip install -q -r requirements-serve.txt
	touch $@

# The page's test drives Debian's chromium through Playwright (whose own browser download is not needed): installed
# with apt-get (as root, as CI runs) only where no chromium is on PATH.
setup-browser:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
	{ apt-get update -q && apt-get install -y -q chromium; }

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt
	touch $@

data: setup
	@if [ -e input/train ] || [ -e input/train.zip ]; then echo "input/ already holds data: keeping it"; \
	else $(BIN)/python -m competition.synthetic --out input/; fi

folds: data
	$(BIN)/python make_folds.py --data-dir input/ --n-folds 5 --seed 42 --out folds/folds.csv

train: folds
	$(BIN)/python train.py --config configs/cpu_demo.toml --fold 0 --resume

infer: train
	$(BIN)/python infer.py --tta --checkpoints $(DEMO_RUN) --out submissions/submission.csv --overwrite
	$(BIN)/python infer.py --oof --tta --checkpoints $(DEMO_RUN)
	@if [ -e input/test_masks.csv ]; then \
	$(BIN)/python -m competition.metrics submissions/submission.csv input/test_masks.csv; fi

demo: infer

parts: setup
	@if [ -e input-parts/images ]; then echo "input-parts/ already holds data: keeping it"; \
	else $(BIN)/python -m competition.synthetic --parts --out input-parts/; fi
	$(BIN)/python make_folds.py --data-dir input-parts/ --group-regex '^(.+)_\d+$$' --out folds/parts.csv
	$(BIN)/python train.py --config configs/cpu_parts.toml --fold 0 --resume
	$(BIN)/python infer.py --tta --checkpoints runs/parts --out submissions/parts/ --overlays --overwrite
	$(BIN)/python -m competition.metrics submissions/parts/ input-parts/test_masks/

ML_DATA := input-multilabel
ML_RUN := runs/multilabel
# The head, the masks' table and its classes: the data flags of make_folds.py and train.py
ML_TABLE := --head multilabel --masks-csv train.csv --rle-columns id,class,segmentation --classes car,glass,shadow

multilabel: setup
	@if [ -e $(ML_DATA)/train.csv ]; then echo "$(ML_DATA)/ already holds data: keeping it"; \
	else $(BIN)/python -m competition.synthetic --multilabel --out $(ML_DATA)/; fi
	$(BIN)/python make_folds.py --config configs/cpu_multilabel.toml $(ML_TABLE) --n-folds 2 --group-regex '^(.+)_\d+$$'
	$(BIN)/python train.py --config configs/cpu_multilabel.toml $(ML_TABLE) --folds 0,1 --resume
	$(BIN)/python infer.py --oof --tune --tta --checkpoints $(ML_RUN) --overwrite
	$(BIN)/python infer.py --tta --checkpoints $(ML_RUN) --sample-submission $(ML_DATA)/sample_submission.csv \
	--out submissions/multilabel.csv --overwrite
	$(BIN)/python -m competition.metrics submissions/multilabel.csv $(ML_DATA)/test_masks.csv

SLIDES_DATA := input-slides
SLIDES_RUN := runs/slides

slides: setup setup-slides
	@if [ -e $(SLIDES_DATA)/train.csv ]; then echo "$(SLIDES_DATA)/ already holds data: keeping it"; \
	else $(BIN)/python -m competition.synthetic --slides --slide-size 2048 --slide-count 3 --test-slide-count 1 \
	--out $(SLIDES_DATA)/; fi
	$(BIN)/python make_folds.py --config configs/cpu_slides.toml --n-folds 3
	$(BIN)/python train.py --config configs/cpu_slides.toml --fold 0 --resume
	$(BIN)/python infer.py --tile 256 --tile-overlap 0.25 --checkpoints $(SLIDES_RUN) --rle-order column \
	--sample-submission $(SLIDES_DATA)/sample_submission.csv --out submissions/slides.csv --overwrite
	$(BIN)/python -m competition.metrics submissions/slides.csv $(SLIDES_DATA)/test_masks.csv

test: setup setup-cluster setup-tensorboard setup-slides setup-serve setup-browser
	$(BIN)/ruff check .
	PYTHONPATH=. $(BIN)/lint-imports
	$(BIN)/python -m pytest -q

test-fast: setup setup-slides setup-serve
	$(BIN)/ruff check .
	PYTHONPATH=. $(BIN)/lint-imports
	$(BIN)/python -m pytest -q -m "not slow"

bench: setup
	$(BIN)/python -m bench.rle_bench
	$(BIN)/python -m bench.train_bench --size 256x384 --batch-size 4 --steps 6 --warmup 2 --workers 2
	$(BIN)/python -m bench.infer_bench --size 256x384 --batch-size 4 --workers 2 --steps 10
	$(BIN)/python -m bench.memory_bench --size 640x960 --batch-sizes 1,2,4 --precision bf16
	$(BIN)/python -m bench.loader_bench --size 640x960

bench-gpu: setup
	$(BIN)/python -m bench.gpu_report --out bench/results/gpu.md
