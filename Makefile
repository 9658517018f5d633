# egolcd — quick start: `make demo` (generate a long video) and `make test` (the test suite).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# CPU build of PyTorch, pinned so a fresh machine installs it from local disk (see README).
TORCH_PIN ?= torch==2.13.0

.PHONY: venv test demo demo-recipe studio lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_PIN)"
	bash scripts/install_system_deps.sh
	$(PY) -m pip install -q -e ".[dev,sim,studio]"
	touch $@

venv: $(VENV)/.installed

test: venv
	$(PY) -m pytest tests

lint: venv
	$(VENV)/bin/ruff check egolcd tests

demo: venv
	@mkdir -p outputs
	$(VENV)/bin/egolcd generate examples/maze_revisit.yaml -o outputs/maze_revisit.mp4
	@echo "video written to outputs/maze_revisit.mp4"

# The embedded demo model's whole training recipe on the CPU (resumable; see egolcd/assets/demo/README.md).
WORKDIR ?= .
demo-recipe: venv
	bash scripts/demo_recipe.sh $(WORKDIR)

studio: venv
	$(VENV)/bin/egolcd studio

clean:
	rm -rf $(VENV) outputs .pytest_cache
