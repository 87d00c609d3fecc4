# `make demo`: install, train the text-to-image MNIST recipe (a step budget: about 10 minutes; MINUTES caps it),
# write a grid for fixed prompts and the cross-attention figure.
# `make test`: install and run the whole test suite.
PY ?= python3
RUN ?= runs/mnist-text
MINUTES ?= 30

EMOJI_MINUTES ?= 30
PVL_MINUTES ?= 10

.PHONY: install demo test bench browser figures

install:
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps k-diffusion==0.1.1.post1  # A1111's samplers, for the tests (its deps are heavy)

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

# `make figures`: the README's pictures under docs/, each from a real run made here (the README gives the minutes
# and the machine of the committed ones): the demo's grid and figures, the emoji grid, pixel vs latent
figures: demo
	cp $(RUN)/grid.png docs/mnist-text-grid.png && cp $(RUN)/attention.png docs/attention.png
	nanosd explain reverse $(RUN) "a handwritten 3" --out docs/reverse.png
	nanosd explain latent $(RUN) --out docs/latent.png
	nanosd explain forward --out docs/forward.png
	nanosd explain seeds $(RUN) "a handwritten 4" --out docs/a1111-seeds.png
	nanosd train configs/emoji-text.toml --out runs/fig-emoji --minutes $(EMOJI_MINUTES)
	nanosd generate runs/fig-emoji --prompts configs/emoji-text-prompts.txt --n 8 --seed 0 --out docs/emoji-grid.png
	$(PY) benchmarks/pixel_vs_latent.py --minutes $(PVL_MINUTES) --n 500 --out runs/fig-pvl
	cp runs/fig-pvl/pixel_vs_latent.png docs/pixel-vs-latent.png
	nanosd train configs/mnist-text-xl.toml --out runs/fig-xl
	nanosd explain size runs/fig-xl --out docs/size-conditioning.png
	nanosd train configs/fashion-lora.toml --out runs/fig-fashion-lora lora.base=$(RUN)
	nanosd generate runs/fig-fashion-lora --prompts configs/fashion-prompts.txt --n 8 --seed 0 --out docs/fashion-lora.png
	nanosd train configs/mnist-control.toml --out runs/fig-control controlnet.base=$(RUN)
	nanosd explain control runs/fig-control --out docs/mnist-control.png
