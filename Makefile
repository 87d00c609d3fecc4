# `make demo`: install, train the text-to-image MNIST recipe for 10 minutes, write a grid for fixed prompts.
# `make test`: install and run the whole test suite.
PY ?= python3
RUN ?= runs/mnist-text
MINUTES ?= 10

.PHONY: install demo test bench browser

install:
	$(PY) -m pip install -q -e '.[test]'

demo: install
	nanosd train configs/mnist-text.toml --out $(RUN) --minutes $(MINUTES)
	nanosd generate $(RUN) --prompts configs/mnist-text-prompts.txt --n 8 --seed 0 --out $(RUN)/grid.png
	nanosd explain attention $(RUN) "a handwritten 7"
	@echo "prompt grid: $(RUN)/grid.png (a row per line of configs/mnist-text-prompts.txt)   cross-attention: $(RUN)/attention.png"

test: install browser
	$(PY) -m pytest -q

browser:  # Debian's chromium, for the web page's end-to-end test (root, as on these machines)
	@command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)

bench: install
	$(PY) benchmarks/speed.py configs/mnist-pixel.toml
