# `make demo`: install, fetch MNIST, train the pixel recipe for 30 minutes, write a grid.
# `make test`: install and run the whole test suite.
PY ?= python3
RUN ?= runs/mnist-pixel
MINUTES ?= 30

.PHONY: install demo test bench

install:
	$(PY) -m pip install -q -e '.[test]'

demo: install
	nanosd data get mnist
	nanosd train configs/mnist-pixel.toml --out $(RUN) --minutes $(MINUTES)
	nanosd generate $(RUN) --n 64 --seed 0 --out $(RUN)/grid.png
	nanosd explain reverse $(RUN)
	@echo "samples: $(RUN)/grid.png   sampling figure: $(RUN)/reverse.png"

test: install
	$(PY) -m pytest -q

bench: install
	$(PY) benchmarks/speed.py configs/mnist-pixel.toml
