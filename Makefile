VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

DEMO_CKPT ?= checkpoints/default
DEMO_BUNDLE ?= engines/default-bundle
DEMO_PROMPT ?= a large red circle in the center on a blue background
# guidance 3: the default model's best colour accuracy (README, training figures)
DEMO_GUIDANCE ?= 3
DEMO_OUT ?= engines/demo.png
DEMO_STEPS ?= 30
# the 4-step student distilled from the default model (training/recipes/lcm_default.sh): `make demo-lcm`
LCM_CKPT ?= checkpoints/default-lcm

.PHONY: install test demo demo-lcm typecheck clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[cpu,openvino,train,export,serve,ray,dev]'
	$(PIP) install -q --no-deps tensorrt-stubs==10.13.0.35.1
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -ra

# export the shipped checkpoint (once, or again when it changed), then generate with the torch-free runtime
demo: $(STAMP)
	@test -f $(DEMO_BUNDLE)/manifest.json -a $(DEMO_BUNDLE)/manifest.json -nt $(DEMO_CKPT)/ldm_checkpoint.json || \
		$(VENV)/bin/ldm export $(DEMO_CKPT) $(DEMO_BUNDLE) --precision fp32
	$(VENV)/bin/ldm generate $(DEMO_BUNDLE) "$(DEMO_PROMPT)" --seed 0 --steps $(DEMO_STEPS) \
		--guidance-scale $(DEMO_GUIDANCE) --out $(DEMO_OUT)

# the same prompt through the distilled student: 4 steps, no unconditional pass (its U-Net embeds the guidance)
demo-lcm:
	$(MAKE) demo DEMO_CKPT=$(LCM_CKPT) DEMO_BUNDLE=engines/default-lcm-bundle DEMO_STEPS=4 DEMO_OUT=engines/demo-lcm.png

# mypy on the TensorRT code (the files mypy.ini names) against repaired tensorrt-stubs
TRT_STUBS := .mypy_cache/tensorrt-stubs-fixed
typecheck: $(STAMP)
	$(PY) tools/tensorrt_stubs.py $(TRT_STUBS)
	MYPYPATH=$(TRT_STUBS) $(PY) -m mypy

clean:
	rm -rf $(VENV) build *.egg-info
